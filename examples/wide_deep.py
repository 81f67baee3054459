"""`wide_deep`: a wide-and-deep recommender whose first ops handle strings (issue 17).

The shape of most ranking and fraud models TF Serving users run: an item id looked up in a
500-item vocabulary (Keras `StringLookup`, one out-of-vocabulary index) into an `Embedding`, a
free-text query hashed into 64 buckets (`Hashing`, TensorFlow's StringToHashBucketFast) into a
small embedding (the wide part), four dense features, and an MLP. Weights are seeded random: the
point is the graph, not what it predicts. Two signatures:
- "serving_default": {"item": string [None], "query": string [None], "dense": float32 [None, 4]}
- "examples": {"examples": serialized tf.Example [None]} with features item and query (bytes,
  default ""), dense (4 floats, required), parsed by ParseExampleV2 in the graph.
Both give {"score": float32 [None, 1]}. Kiln runs the string front on the host and the rest AOT.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

VOCABULARY = tuple(f"item_{i:04d}" for i in range(500))
HASH_BINS = 64
DENSE = 4


def build_model():
    """The Keras model over raw features, with seeded random weights."""
    import keras

    keras.utils.set_random_seed(17)
    item = keras.Input(shape=(), dtype="string", name="item")
    query = keras.Input(shape=(), dtype="string", name="query")
    dense = keras.Input(shape=(DENSE,), dtype="float32", name="dense")
    ids = keras.layers.StringLookup(vocabulary=list(VOCABULARY), num_oov_indices=1, name="item_ids")(item)
    deep = keras.layers.Embedding(len(VOCABULARY) + 1, 8, name="item_embedding")(ids)
    buckets = keras.layers.Hashing(HASH_BINS, name="query_buckets")(query)
    wide = keras.layers.Embedding(HASH_BINS, 4, name="query_embedding")(buckets)
    joined = keras.layers.Concatenate()([deep, wide, dense])
    hidden = keras.layers.Dense(32, activation="relu", name="hidden_1")(joined)
    hidden = keras.layers.Dense(16, activation="relu", name="hidden_2")(hidden)
    score = keras.layers.Dense(1, activation="sigmoid", name="score")(hidden)
    return keras.Model({"item": item, "query": query, "dense": dense}, score)


def save(out: Path, log: Callable[[str], None] = print) -> None:
    import keras
    import tensorflow as tf

    model = build_model()
    features = {
        "item": tf.io.FixedLenFeature([], tf.string, default_value=""),
        "query": tf.io.FixedLenFeature([], tf.string, default_value=""),
        "dense": tf.io.FixedLenFeature([DENSE], tf.float32),
    }
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        name="serving_default",
        fn=lambda item, query, dense: {"score": model({"item": item, "query": query, "dense": dense})},
        input_signature=[tf.TensorSpec((None,), tf.string, name="item"),
                         tf.TensorSpec((None,), tf.string, name="query"),
                         tf.TensorSpec((None, DENSE), tf.float32, name="dense")],
    )
    archive.add_endpoint(
        name="examples",
        fn=lambda examples: {"score": model(tf.io.parse_example(examples, features))},
        input_signature=[tf.TensorSpec((None,), tf.string, name="examples")],
    )
    archive.write_out(str(out), verbose=False)
    log(f"wide_deep: {len(VOCABULARY)}-item vocabulary, {HASH_BINS} hash bins, signatures serving_default, examples")
