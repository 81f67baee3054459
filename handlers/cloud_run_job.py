"""The Cloud Run Jobs entry point: batch scoring of a set of input objects, shared out among the
job's tasks.

    python -m handlers.cloud_run_job [INPUT ...]

INPUTs are object URLs or prefixes (gs://, s3://, paths); without arguments, KILN_SCORE_INPUTS
(comma-separated). Every task expands the inputs to the same sorted list of objects and scores its
own share of it (runtime.scoring.shard by CLOUD_RUN_TASK_INDEX of CLOUD_RUN_TASK_COUNT, which
Cloud Run sets; 0 of 1 otherwise), each object into KILN_OUTPUT_PREFIX with KILN_SCORE_MODEL, the
models from the same KILN_* settings as the service. It logs one JSON summary line, and exits 1 if
any object failed: Cloud Run then retries the task (up to the job's max retries), and the rerun
skips what is already scored (scoring finds the result of the same object in place). Rows an object
holds that cannot be scored are recorded by scoring and do not fail the task: a rerun could not
change them. Wrong arguments or settings exit 2 before anything is scored.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Mapping, Sequence

from runtime import logs
from runtime.errors import ConfigError, KilnError

log = logging.getLogger("kiln.job")
USAGE_ERROR = 2
MAX_LISTED = 100  # failures named in the summary line (Cloud Logging takes 256 KiB a line)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] = os.environ) -> int:
    from runtime.settings import Settings

    try:
        settings = Settings.from_env(environ)
        logs.configure(settings.log_level)
        index, count = _task(environ)
        inputs = list(sys.argv[1:] if argv is None else argv) or [
            item.strip() for item in environ.get("KILN_SCORE_INPUTS", "").split(",") if item.strip()
        ]
        if not inputs:
            raise ConfigError(
                "no inputs: pass object URLs or prefixes as arguments, or set KILN_SCORE_INPUTS (comma-separated)"
            )
        if not settings.output_prefix:
            raise ConfigError("KILN_OUTPUT_PREFIX is not set: it says where the results go")
    except ConfigError as e:
        logs.configure()
        log.error("%s", e)
        return USAGE_ERROR
    return asyncio.run(_score(settings, inputs, index, count))


async def _score(settings, inputs: list[str], index: int, count: int) -> int:
    from runtime.app import App
    from runtime.scoring import expand_inputs, score_object, shard

    app = App.start(settings)
    try:
        try:
            objects = await asyncio.to_thread(expand_inputs, inputs)
        except KilnError as e:
            log.error("cannot list the inputs %s: %s", inputs, e)
            return 1
        mine = shard(objects, index, count)
        results, failed = [], []
        for source in mine:
            try:
                results.append(await score_object(app, source, settings.output_prefix, model=settings.score_model))
            except KilnError as e:
                log.error("%s could not be scored: %s", source, e, extra={"fields": {"source": source}})
                failed.append(source)
            except Exception:  # a bug: the other objects are still scored, the task still fails
                log.exception("internal error scoring %s", source, extra={"fields": {"source": source}})
                failed.append(source)
    finally:
        app.repository.stop()
    summary = {
        "task_index": index,
        "task_count": count,
        "objects": len(objects),
        "assigned": len(mine),
        "scored": sum(not r.skipped for r in results),
        "skipped": sum(r.skipped for r in results),
        "failed": len(failed),
        "rows": sum(r.rows for r in results),
        "row_errors": sum(r.errors for r in results),
        "failures": failed[:MAX_LISTED],
    }  # each is logged on its own as well
    log.info(
        "task %d of %d: %d object(s) scored, %d skipped, %d failed",
        index,
        count,
        summary["scored"],
        summary["skipped"],
        len(failed),
        extra={"fields": {"summary": summary}},
    )
    return 1 if failed else 0


def _task(environ: Mapping[str, str]) -> tuple[int, int]:
    """This task's index and the job's task count, from Cloud Run's variables."""
    values = []
    for name, default in (("CLOUD_RUN_TASK_INDEX", 0), ("CLOUD_RUN_TASK_COUNT", 1)):
        text = environ.get(name, "").strip()
        try:
            values.append(int(text) if text else default)
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {text!r}") from None
    index, count = values
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"CLOUD_RUN_TASK_INDEX must be in [0, CLOUD_RUN_TASK_COUNT); got {index} of {count}")
    return index, count


if __name__ == "__main__":
    sys.exit(main())
