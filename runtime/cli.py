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
    compile_.add_argument("saved_model", type=Path, help="the SavedModel directory")
    compile_.add_argument("out", type=Path, help="the servable directory to write (BASE/NAME/VERSION)")
    compile_.add_argument("--name", help="model name (default: from OUT)")
    compile_.add_argument("--version", type=int, help="version number (default: from OUT, else 1)")
    compile_.add_argument("--signatures", type=_names, help="comma-separated signature keys (default: all)")
    compile_.add_argument("--batch-sizes", type=_sizes, default=(1, 2, 4, 8, 16, 32),
                          help="comma-separated buckets (default: 1,2,4,8,16,32)")
    compile_.add_argument("--target-cpu", default="native",
                          help="CPU to compile for: native (default), x86-64-v3, x86-64-v4, skylake-avx512...")
    compile_.add_argument("--engine", choices=("auto", "xla-aot", "saved-model"), default="auto",
                          help="auto: AOT where possible, saved-model for the rest; xla-aot: fail instead")
    compile_.add_argument("--tag-set", default="serve", help="MetaGraph tags (default: serve)")
    compile_.set_defaults(run=_compile)

    inspect = commands.add_parser("inspect", help="show a servable's manifest")
    inspect.add_argument("servable", type=Path)
    inspect.add_argument("--json", action="store_true", help="print the manifest as JSON")
    inspect.set_defaults(run=_inspect)

    predict = commands.add_parser("predict", help="run one TensorFlow Serving predict request")
    predict.add_argument("servable", type=Path)
    predict.add_argument("--input", required=True,
                         help="a JSON predict body: inline, @FILE, or - for standard input")
    predict.add_argument("--signature", help="signature key (default: the body's signature_name)")
    predict.set_defaults(run=_predict)

    serve = commands.add_parser("serve", help="serve models over REST and gRPC: TensorFlow Serving's APIs and "
                                "the Open Inference Protocol", description="Every option defaults to its KILN_ "
                                "environment variable (runtime/settings.py), then to the value shown.")
    serve.add_argument("--model-repository", help="BASE holding NAME/VERSION: a path or s3://bucket/prefix; "
                       "every NAME in it is served (latest version) unless --model-name picks one")
    serve.add_argument("--model-name", help="serve only BASE/NAME of --model-repository")
    serve.add_argument("--model-config-file", help="models.config (text format), YAML or JSON; local or s3://")
    serve.add_argument("--rest-port", type=int, default=8501)
    serve.add_argument("--grpc-port", type=int, default=8500, help="gRPC port (0: no gRPC)")
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--poll-seconds", type=float,
                       help="how often to look for new versions (default 1; 0: once; negative: never)")
    serve.add_argument("--cors-origins", help="origins browsers may call from: '*' or a comma-separated list")
    serve.add_argument("--max-body-bytes", type=int, help="request body limit (default 64 MiB)")
    serve.add_argument("--log-level", help="JSON logs to stderr at this level (default INFO)")
    serve.add_argument("--access-log", action="store_true", default=None, help="log a JSON line per request")
    batching = serve.add_argument_group("batching", "TensorFlow Serving's batching parameters; a model's own "
                                        "batching_parameters in a YAML or JSON model config override them")
    batching.add_argument("--batching", dest="mode", choices=("adaptive", "fixed", "off"),
                          help="adaptive (default): wait only while it pays off; fixed: TF Serving's timeout rule; "
                          "off: every request alone")
    batching.add_argument("--batching-parameters-file", help="TF Serving's batching parameters (text format), "
                          "or YAML/JSON")
    for name in ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads"):
        batching.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int)
    batching.add_argument("--allowed-batch-sizes", dest="allowed_batch_sizes", type=_sizes,
                          help="comma-separated, increasing, the last equal to --max-batch-size")
    for name in ("pad_variable_length_inputs", "enable_large_batch_splitting"):
        batching.add_argument(f"--{name.replace('_', '-')}", dest=name, action="store_true", default=None)
    serve.set_defaults(run=_serve)

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except KilnError as e:
        print(f"kiln {args.command}: error: {e}", file=sys.stderr)
        return 1


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in _names(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


def _compile(args) -> int:
    from runtime.compiler.compile import compile_servable

    manifest = compile_servable(
        args.saved_model, args.out, name=args.name, version=args.version, signatures=args.signatures,
        batch_sizes=args.batch_sizes, target_cpu=args.target_cpu, engine=args.engine,
        tags=args.tag_set, log=lambda message: print(f"kiln compile: {message}", file=sys.stderr))
    from runtime.table import render

    print(render(manifest))
    return 0


def _inspect(args) -> int:
    from runtime.table import render
    from runtime.manifest import read_manifest

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
    from handlers.local import serve
    from runtime import logs
    from runtime.app import App
    from runtime.settings import Settings

    flags = ("model_repository", "model_name", "model_config_file", "poll_seconds", "cors_origins", "max_body_bytes",
             "log_level", "access_log", "batching_parameters_file", "mode", "max_batch_size", "batch_timeout_micros",
             "max_enqueued_batches", "num_batch_threads", "allowed_batch_sizes", "pad_variable_length_inputs",
             "enable_large_batch_splitting")
    settings = Settings.from_env(overrides={name: getattr(args, name) for name in flags})
    logs.configure(settings.log_level)
    app = App.start(settings)
    try:
        serve(app, host=args.host, rest_port=args.rest_port, grpc_port=args.grpc_port or None)
    finally:
        app.repository.stop()
    return 0


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
