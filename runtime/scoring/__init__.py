"""Batch scoring: every row of a stored object through a model, the results written beside it.

The Lambda handler calls score_object for S3 object-created events, the Cloud Run handler for Cloud
Storage object-finalize events and, with expand_inputs and shard, in Cloud Run Jobs; `kiln score`
for inputs named on the command line. Model work goes through App.execute, so the micro-batcher
merges the chunks of an object that are in flight together.

    sources.py   the objects an input names, located; which are results
    sharding.py  Cloud Run Jobs' task shares
    job.py       one object's scoring and its resume; many objects at once
    pipeline.py  chunks in flight, gathered into parts in input order
    formats.py   JSON Lines and CSV rows read and decoded; result and error lines
"""

from runtime.scoring.job import ScoreResult, default_model, score_many, score_object
from runtime.scoring.sharding import shard
from runtime.scoring.sources import expand_inputs, input_size, plan_inputs

__all__ = [
    "ScoreResult",
    "default_model",
    "expand_inputs",
    "input_size",
    "plan_inputs",
    "score_many",
    "score_object",
    "shard",
]
