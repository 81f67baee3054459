"""The `kiln` command. Each subcommand imports what it needs when it runs: start-up stays fast."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from runtime.errors import KilnError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kiln", description="Serverless inference for TensorFlow models.")
    commands = parser.add_subparsers(dest="command", required=True)

    compile_ = commands.add_parser("compile", help="compile a SavedModel into a servable")
    compile_.add_argument("saved_model", help="the SavedModel directory (with --watch: a base URL of NAME/VERSION/)")
    compile_.add_argument("out", help="the servable directory to write (BASE/NAME/VERSION; with --watch: BASE)")
    compile_.add_argument(
        "--watch",
        action="store_true",
        help="compile every new SavedModel version under SAVED_MODEL into OUT (runtime/compile_watch.py)",
    )
    compile_.add_argument("--once", action="store_true", help="with --watch: compile what is there now, then exit")
    compile_.add_argument(
        "--only",
        type=_name_and_version,
        metavar="NAME/VERSION",
        help="with --watch --once: that version alone (the compile function's event)",
    )
    compile_.add_argument("--poll-seconds", type=float, default=2.0, help="with --watch: seconds between looks")
    compile_.add_argument("--name", help="model name (default: from OUT)")
    compile_.add_argument("--version", type=int, help="version number (default: from OUT, else 1)")
    compile_.add_argument("--signatures", type=_names, help="comma-separated signature keys (default: all)")
    compile_.add_argument(
        "--batch-sizes",
        type=_sizes,
        default=(1, 2, 4, 8, 16, 32),
        help="comma-separated buckets (default: 1,2,4,8,16,32)",
    )
    compile_.add_argument(
        "--target-cpu",
        type=_names,
        default=["native"],
        help="CPU to compile for: native (default), x86-64-v3, x86-64-v4, skylake-avx512..., or "
        "for Graviton aarch64-generic, neoverse-n1, neoverse-v1, neoverse-v2; one per architecture, "
        "comma-separated, builds one servable for each (x86-64-v3,neoverse-n1)",
    )
    compile_.add_argument(
        "--engine",
        choices=("auto", "xla-aot", "saved-model"),
        default="auto",
        help="auto: AOT where possible, saved-model for the rest; xla-aot: fail instead",
    )
    compile_.add_argument("--tag-set", default="serve", help="MetaGraph tags (default: serve)")
    compile_.add_argument(
        "--state",
        default="",
        metavar="SIGNATURE:INPUT=OUTPUT[,...]",
        help="stateful signatures: each INPUT is a session's state, fed back from OUTPUT",
    )
    compile_.add_argument(
        "--state-capacity",
        default="",
        metavar="SIGNATURE:INPUT=TOKENS[,...]",
        help="the state INPUT that counts the tokens a session holds, and the most it can hold",
    )
    compile_.add_argument(
        "--state-append",
        default="",
        metavar="SIGNATURE:INPUT[,...]",
        help="state INPUTs whose OUTPUT is only the new entries, written at the position",
    )
    compile_.add_argument(
        "--embed-runtime",
        action="store_true",
        help="put the runtime library (7 MB) in the servable, instead of installing it here and "
        "writing it once per store in BASE/.kiln/runtime/ (runtime/runtime_library.py)",
    )
    compile_.set_defaults(run=_compile)

    inspect = commands.add_parser("inspect", help="show a servable's manifest")
    inspect.add_argument("servable", type=Path)
    inspect.add_argument("--json", action="store_true", help="print the manifest as JSON")
    inspect.set_defaults(run=_inspect)

    predict = commands.add_parser("predict", help="run one TensorFlow Serving predict request")
    predict.add_argument("servable", type=Path)
    predict.add_argument("--input", required=True, help="a JSON predict body: inline, @FILE, or - for standard input")
    predict.add_argument("--signature", help="signature key (default: the body's signature_name)")
    predict.set_defaults(run=_predict)

    serve = commands.add_parser(
        "serve",
        help="serve models over REST and gRPC: TensorFlow Serving's APIs and the Open Inference Protocol",
        description="Every option defaults to its KILN_ "
        "environment variable (runtime/settings.py), then to the value shown.",
    )
    _model_options(serve, "every NAME in it, latest version")
    serve.add_argument("--rest-port", type=int, default=8501)
    serve.add_argument("--grpc-port", type=int, default=8500, help="gRPC port (0: no gRPC)")
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument(
        "--workers",
        type=int,
        help="worker processes sharing the ports, each with its own event loop "
        "and batcher (handlers/supervisor.py; default: the CPUs this process may use; 1: one process)",
    )
    serve.add_argument(
        "--poll-seconds", type=float, help="how often to look for new versions (default 1; 0: once; negative: never)"
    )
    serve.add_argument("--cors-origins", help="origins browsers may call from: '*' or a comma-separated list")
    serve.add_argument("--max-body-bytes", type=int, help="request body limit (default 64 MiB)")
    serve.add_argument("--log-level", help="JSON logs to stderr at this level (default INFO)")
    serve.add_argument("--access-log", action="store_true", default=None, help="log a JSON line per request")
    serve.add_argument("--redis-url", help="where agent sessions live (Redis 7 or Valkey; default: in this process)")
    serve.add_argument(
        "--reload",
        choices=("admin", "off", "open"),
        help="who may reload the model configuration over gRPC: admin (default: a KILN_ADMIN_KEYS "
        "key), off, or open (anyone, as TF Serving; not with KILN_API_KEYS)",
    )
    limits = serve.add_argument_group(
        "connections", "time and number limits of REST connections and gRPC calls (README, 'Timeouts and limits')"
    )
    limits.add_argument(
        "--header-timeout-seconds",
        type=float,
        help="a request's headers must all arrive within "
        "this from its first byte; a new connection must send one within it (default 30)",
    )
    limits.add_argument(
        "--body-timeout-seconds", type=float, help="each stretch of a request body must arrive within this (default 60)"
    )
    limits.add_argument(
        "--keepalive-timeout-seconds",
        type=float,
        help="idle time allowed between requests, longer than the load balancer's idle timeout (default 620)",
    )
    limits.add_argument(
        "--max-connections",
        type=int,
        help="REST connections and gRPC calls at once; more get 503 / RESOURCE_EXHAUSTED (default 2000; 0: no cap)",
    )
    batching = serve.add_argument_group(
        "batching",
        "TensorFlow Serving's batching parameters; a model's own "
        "batching_parameters in a YAML or JSON model config override them",
    )
    batching.add_argument(
        "--batching",
        dest="mode",
        choices=("adaptive", "fixed", "off"),
        help="adaptive (default): wait only while it pays off; fixed: TF Serving's timeout rule; "
        "off: every request alone",
    )
    batching.add_argument(
        "--batching-parameters-file", help="TF Serving's batching parameters (text format), or YAML/JSON"
    )
    for name in ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads"):
        batching.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int)
    batching.add_argument(
        "--allowed-batch-sizes",
        dest="allowed_batch_sizes",
        type=_sizes,
        help="comma-separated, increasing, the last equal to --max-batch-size",
    )
    for name in ("pad_variable_length_inputs", "enable_large_batch_splitting"):
        batching.add_argument(f"--{name.replace('_', '-')}", dest=name, action="store_true", default=None)
    from runtime.tfserving_flags import add_flags

    add_flags(serve)
    serve.set_defaults(run=_serve)

    score = commands.add_parser(
        "score",
        help="score the rows of JSON Lines and CSV files with a model",
        description="Score every row of each input and write JSON Lines results under "
        "OUT/NAME.predictions/ (runtime/scoring/). Inputs whose results exist are "
        "skipped and finished parts kept: rerun the same command to resume.",
    )
    score.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="a .jsonl, .ndjson or .csv file (optionally .gz), "
        "a directory, or s3://BUCKET/KEY, s3://BUCKET/PREFIX/, gs://...",
    )
    score.add_argument(
        "--out",
        help="where results go: a directory, s3://bucket/prefix or gs://bucket/prefix (default: KILN_OUTPUT_PREFIX)",
    )
    score.add_argument("--model", help="the model to score with (default: KILN_SCORE_MODEL, else the only one)")
    score.add_argument("--signature", default="serving_default", help="signature key (default: serving_default)")
    _model_options(score, "--model's, else every NAME")
    score.add_argument("--chunk-rows", type=int, default=256, help="rows decoded and run together (default 256)")
    score.add_argument(
        "--part-rows",
        type=int,
        default=10_000,
        help="rows per results part, the most an interruption loses (default 10000)",
    )
    score.add_argument("--inputs-at-once", type=int, default=2, help="inputs scored at the same time (default 2)")
    score.set_defaults(run=_score)

    warmpool = commands.add_parser("warmpool", help="size a warm pool and apply it (warmpool/)")
    pool = warmpool.add_subparsers(dest="warmpool_command", required=True)
    plan = pool.add_parser(
        "plan",
        help="warm instances per window from a schedule and observed traffic",
        description="File formats and the model (Little's law, square-root staffing, Erlang B): warmpool/plan.py.",
    )
    plan.add_argument("--schedule", help="YAML/JSON: timezone and windows (days, start, end, min_instances)")
    plan.add_argument("--traffic", help="YAML/JSON: buckets (start, end, rate, latency) or requests [[time, seconds]]")
    plan.add_argument("--memory-gb", type=float, default=1.0, help="memory of one instance (default 1)")
    plan.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="requests one instance serves at once (Lambda: 1; Cloud Run: containerConcurrency)",
    )
    plan.add_argument(
        "--headroom",
        default="sqrt:1",
        help="sqrt:K (L + K·√L, default sqrt:1), factor:F (F·L) or "
        "target:P (the fewest instances whose expected cold-start fraction is at most P)",
    )
    plan.add_argument("--timezone", help="IANA time zone of the windows (default: the schedule's, else UTC)")
    plan.add_argument("--out", help="also write the plan to this file (.json, else YAML), for `apply`")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(run=_warmpool, command="warmpool plan")
    apply = pool.add_parser(
        "apply",
        help="apply a plan: Lambda provisioned concurrency or Cloud Run min instances",
        description="What it calls and writes: warmpool/apply.py.",
    )
    apply.add_argument("--plan", required=True, help="a plan written by `kiln warmpool plan --out`")
    apply.add_argument("--lambda-function", help="the Lambda function (boto3's usual region and credentials)")
    apply.add_argument("--alias", default="live", help="the function's alias (default: live)")
    apply.add_argument(
        "--scheduled-actions",
        action="store_true",
        help="Lambda: also put every change of the plan as an Application Auto Scaling scheduled action",
    )
    apply.add_argument(
        "--cloud-run-service",
        nargs="?",
        const="infra/cloud_run/service.yaml",
        help="the Cloud Run service YAML to write (default: infra/cloud_run/service.yaml)",
    )
    apply.add_argument(
        "--level",
        choices=("auto", "service", "revision"),
        default="auto",
        help="Cloud Run: service- or revision-level minimum (default: the one the file uses)",
    )
    apply.add_argument("--region", help="Cloud Run region for the printed gcloud commands")
    apply.add_argument("--at", help="apply the window of this ISO 8601 time (default: now)")
    apply.set_defaults(run=_warmpool, command="warmpool apply")

    coldstart = commands.add_parser(
        "coldstart",
        help="one cold start, phase by phase, in a fresh process",
        description="Phases: warmpool/coldstart.py.",
    )
    coldstart.add_argument("servable", help="a servable directory, BASE/NAME[/VERSION], or s3:// gs:// URL")
    coldstart.add_argument("--runs", type=int, default=1, help="fresh processes to take the median of (default 1)")
    coldstart.add_argument("--cache-dir", help="servable cache to download into (default: a fresh empty one)")
    coldstart.add_argument("--signature", help="signature of the first request (default serving_default)")
    coldstart.add_argument("--json", action="store_true", help="print the phases and every run as JSON")
    coldstart.set_defaults(run=_coldstart)

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(_screened(argv))
    except KilnError as e:  # a TF Serving flag Kiln refuses
        print(f"kiln serve: error: {e}", file=sys.stderr)
        return 2
    args.argv = argv  # what a worker of `kiln serve` is started with
    try:
        return args.run(args)
    except KilnError as e:
        print(f"kiln {args.command}: error: {e}", file=sys.stderr)
        return 1


def _screened(argv: list[str]) -> list[str]:
    """`kiln serve`'s arguments without the TF Serving flags Kiln ignores (runtime.tfserving_flags)."""
    if not argv or argv[0] != "serve":
        return argv
    from runtime.tfserving_flags import screen

    return ["serve", *screen(argv[1:])]


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in _names(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


def _model_options(parser: argparse.ArgumentParser, loaded: str) -> None:
    """Which models `kiln serve` and `kiln score` load (runtime/settings.py reads them alike);
    `loaded`: what --model-repository loads without --model-name."""
    parser.add_argument("--model-repository", help="BASE holding NAME/VERSION: a path or s3://bucket/prefix")
    parser.add_argument("--model-name", help=f"load only BASE/NAME of --model-repository (default: {loaded})")
    parser.add_argument("--model-config-file", help="models.config (text format), YAML or JSON; local or s3://")


def _name_and_version(text: str) -> tuple[str, int]:
    name, _, version = text.partition("/")
    if not name or not version.isdigit():
        raise argparse.ArgumentTypeError(f"expected NAME/VERSION (a model name, a version number), got '{text}'")
    return name, int(version)


def _compile(args) -> int:
    from runtime.compiler.compile import compile_servable
    from runtime.compiler.state_declarations import parse_appended, parse_capacities, parse_state
    from runtime.progress import say

    options = dict(
        signatures=args.signatures,
        batch_sizes=args.batch_sizes,
        target_cpu=args.target_cpu,
        engine=args.engine,
        tags=args.tag_set,
        state=parse_state(args.state),
        positions=parse_capacities(args.state_capacity),
        appended=parse_appended(args.state_append),
        embed_runtime=args.embed_runtime,
        log=lambda message: say(f"kiln compile: {message}"),
    )
    if args.watch:
        from runtime.compile_watch import Watcher

        watcher = Watcher(args.saved_model, args.out, options, say=lambda message: say(f"kiln compile: {message}"))
        if not args.once:
            watcher.run(args.poll_seconds)
        watcher.run_once(args.only)
        return 1 if watcher.failed else 0
    manifest = compile_servable(Path(args.saved_model), Path(args.out), name=args.name, version=args.version, **options)
    from runtime.table import render

    print(render(manifest))
    return 0


def _inspect(args) -> int:
    from runtime.manifest import read_manifest
    from runtime.table import render

    manifest = read_manifest(args.servable)
    print(manifest.to_json().decode() if args.json else render(manifest))
    return 0


def _predict(args) -> int:
    from runtime.codecs.tfserving import decode_predict, encode_predict, read_predict
    from runtime.engines import open_servable

    body = _read_input(args.input)
    name, request = read_predict(body)
    engine = open_servable(args.servable)
    try:
        key = args.signature or name
        decoded = decode_predict(key, request, engine.signature(key))
        outputs = engine.run(key, decoded.inputs)
    finally:
        engine.close()
    sys.stdout.buffer.write(encode_predict(outputs, decoded.row_format) + b"\n")
    return 0


def _serve(args) -> int:
    import importlib
    import os
    import threading

    from handlers.supervisor import WORKER_ENV, available_cpus
    from runtime import logs
    from runtime.settings import Settings

    flags = (
        "model_repository",
        "model_name",
        "model_config_file",
        "poll_seconds",
        "cors_origins",
        "max_body_bytes",
        "log_level",
        "access_log",
        "redis_url",
        "reload",
        "batching_parameters_file",
        "mode",
        "max_batch_size",
        "batch_timeout_micros",
        "max_enqueued_batches",
        "num_batch_threads",
        "allowed_batch_sizes",
        "pad_variable_length_inputs",
        "enable_large_batch_splitting",
        "header_timeout_seconds",
        "body_timeout_seconds",
        "keepalive_timeout_seconds",
        "max_connections",
        "workers",
    )
    from runtime.tfserving_flags import apply

    overrides = {name: getattr(args, name) for name in flags} | apply(args)
    settings = Settings.from_env(overrides=overrides)
    logs.configure(settings.log_level)
    worker = os.environ.get(WORKER_ENV) is not None
    workers = settings.workers or available_cpus()
    if workers > 1 and not worker:  # before anything imports prometheus_client (runtime.app does)
        from handlers.supervisor import supervise

        if not settings.redis_url:
            import logging

            logging.getLogger("kiln.serve").warning(
                "%d workers and no KILN_REDIS_URL: an agent session lives in the worker that started it, and "
                "another worker refuses it; set KILN_REDIS_URL and KILN_SESSION_KEY, or --workers 1",
                workers,
            )
        return supervise(args.argv, workers, args.host, args.rest_port, args.grpc_port or None)
    from handlers.local import serve

    # The servers' modules import while the models load: importing holds the interpreter lock, but
    # loading mostly does not (hashing, dlopen, the compiled code of the warm-up).
    servers = ["uvicorn", "uvloop", "handlers.grpc.server"] if args.grpc_port else ["uvicorn", "uvloop"]
    preload = threading.Thread(target=lambda: [importlib.import_module(name) for name in servers], daemon=True)
    preload.start()
    from runtime.app import App

    app = App.start(settings)
    preload.join()
    try:
        serve(
            app,
            host=args.host,
            rest_port=args.rest_port,
            grpc_port=args.grpc_port or None,
            settings=settings,
            worker=worker,
        )
    finally:
        app.repository.stop()
    return 0


def _score(args) -> int:
    import asyncio
    import os
    import signal

    import orjson

    from runtime import logs, scoring
    from runtime.app import App
    from runtime.progress import ProgressBar, logging_around_bars
    from runtime.settings import Settings

    settings = Settings.from_env(
        batching_mode="fixed",
        overrides={
            "model_repository": args.model_repository,
            "model_name": args.model_name or (args.model if args.model_repository else None),
            "model_config_file": args.model_config_file,
            "poll_seconds": 0,
        },
    )
    output = args.out or settings.output_prefix
    if not output:
        raise KilnError("no output prefix: pass --out or set KILN_OUTPUT_PREFIX")
    logs.configure(os.environ.get("KILN_LOG_LEVEL") or "WARNING")
    sources, names = scoring.plan_inputs(args.inputs, output)
    bar = ProgressBar(sum(scoring.input_size(source) for source in sources), len(sources))
    counts = {"scored": 0, "skipped": 0, "failed": 0, "rows": 0, "errors": 0}

    def done(source: str, result) -> None:
        if isinstance(result, KilnError):
            counts["failed"] += 1
            bar.message(f"kiln score: {source}: error: {result}")
        else:
            counts["skipped" if result.skipped else "scored"] += 1
            counts["rows"] += result.rows
            counts["errors"] += result.errors
            bar.message(
                orjson.dumps(
                    {
                        "source": source,
                        "output": result.output,
                        "rows": result.rows,
                        "errors": result.errors,
                        "skipped": result.skipped,
                    }
                ).decode(),
                sys.stdout,
            )
        bar.item_done()

    async def run() -> None:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()

        def stop(signum: int) -> None:
            stopped.append(signum)
            if task is not None:
                task.cancel()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop, signum)
        await scoring.score_many(
            app,
            sources,
            output,
            names=names,
            at_once=args.inputs_at_once,
            done=done,
            progress=bar.advance,
            model=args.model or settings.score_model,
            signature=args.signature,
            chunk_rows=args.chunk_rows,
            part_rows=args.part_rows,
        )

    stopped: list[int] = []
    app = App.start(settings)
    try:
        app.repository.named_or_only(args.model or settings.score_model)
        with logging_around_bars():
            asyncio.run(run())
    except asyncio.CancelledError:
        pass
    finally:
        bar.close()
        app.repository.stop()
    summary = (
        f"{counts['scored']} scored, {counts['skipped']} skipped (results exist), {counts['failed']} failed "
        f"of {len(sources)} inputs; {counts['rows']:,} rows ({counts['errors']:,} with errors), "
        f"{bar.rate:,.0f} rows/s"
    )
    if stopped:
        print(f"kiln score: interrupted: {summary}; run the same command again to finish", file=sys.stderr)
        return 128 + stopped[0]
    print(f"kiln score: {summary}", file=sys.stderr)
    return 1 if counts["failed"] else 0


def _warmpool(args) -> int:
    from warmpool import commands

    return commands.plan(args) if args.warmpool_command == "plan" else commands.apply(args)


def _coldstart(args) -> int:
    from warmpool import commands

    return commands.coldstart(args)


def _read_input(value: str) -> bytes:
    if value == "-":
        return sys.stdin.buffer.read()
    if value.startswith("@"):
        try:
            return Path(value[1:]).read_bytes()
        except OSError as e:
            raise KilnError(f"cannot read --input file {value[1:]}: {e.strerror}") from None
    return value.encode()


if __name__ == "__main__":
    sys.exit(main())
