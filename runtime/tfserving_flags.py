"""TensorFlow Serving's command line on `kiln serve`: `tensorflow_model_server --port=8500
--rest_api_port=8501 --model_name=NAME --model_base_path=BASE/NAME` works with `kiln serve` in its
place, and so do the official image's MODEL_NAME and MODEL_BASE_PATH variables.

The flags keep TF Serving's spelling and meaning beside Kiln's own (whose --model-name names a model
inside --model-repository). When any of them is given, batching is off unless --enable_batching, as in
TF Serving (where it then follows the timeout rule: Kiln's `fixed` mode). TF Serving flags that Kiln
cannot honour are never silently ignored: those that only tune TensorFlow's own machinery are warned
about by name, those whose meaning Kiln would get wrong are refused by name.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from runtime.errors import ConfigError

log = logging.getLogger(__name__)

# Tuning of TensorFlow's runtime that Kiln's thin runtime has no counterpart for: warned, then ignored.
IGNORED = {
    "tensorflow_session_parallelism": "Kiln does not run TensorFlow sessions (KILN_INTRA_OP_THREADS sets threads)",
    "tensorflow_intra_op_parallelism": "set KILN_INTRA_OP_THREADS instead",
    "tensorflow_inter_op_parallelism": "compiled code has no inter-op pool",
    "rest_api_num_threads": "REST runs on one event loop with a thread pool for model work",
    "num_load_threads": "versions load one at a time",
    "num_unload_threads": "versions unload one at a time",
    "max_num_load_retries": "store errors are retried with backoff (README, 'The model repository')",
    "load_retry_interval_micros": "store errors are retried with backoff (README, 'The model repository')",
    "flush_filesystem_caches": "servables are mapped from the local cache",
    "enable_signature_method_name_check": "Kiln checks a signature's method for classify and regress",
    "xla_cpu_compilation_enabled": "servables are compiled by XLA ahead of time",
    "enable_profiler": "no TensorFlow profiler runs here",
    "grpc_channel_arguments": "Kiln sets its gRPC server's arguments from its connection limits",
    "per_process_gpu_memory_fraction": "Kiln serves on CPUs",
    "remove_unused_fields_from_bundle_metagraph": "Kiln keeps no MetaGraph in memory",
    "saved_model_tags": "tags are chosen when compiling (kiln compile --tag-set)",
    "rest_api_enable_cors_support": "use --cors-origins",
}
# Flags whose effect Kiln would not give: refused, so that nobody relies on it unknowingly.
REFUSED = {
    "ssl_config_file": "Kiln's gRPC port has no TLS: put it behind the platform's TLS or a proxy",
    "platform_config_file": "Kiln serves compiled servables, not platform configurations",
    "grpc_socket_path": "Kiln's gRPC listens on a TCP port only",
    "use_tflite_model": "Kiln serves no TFLite models",
    "prefer_tflite_model": "Kiln serves no TFLite models",
    "model_config_file_poll_wait_seconds": None,  # refused only when positive: see screen()
    "enable_model_warmup": None,  # refused only when false
    "allow_version_labels_for_unavailable_models": "labels may only name available versions here",
    "thread_pool_factory_config_file": "Kiln has no thread pool factories",
    "mixed_precision": "precision is fixed when compiling",
}
_TRUE, _FALSE = ("", "1", "true", "yes"), ("0", "false", "no")


def add_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "TensorFlow Serving's flags", "tensorflow_model_server's own, with its meanings (runtime/tfserving_flags.py)"
    )
    group.add_argument("--port", dest="tf_port", type=int, help="gRPC port (as --grpc-port)")
    group.add_argument("--rest_api_port", dest="tf_rest_api_port", type=int, help="REST port (as --rest-port)")
    group.add_argument("--model_name", dest="tf_model_name", help="the model's name (default: default)")
    group.add_argument("--model_base_path", dest="tf_model_base_path", help="BASE/NAME holding the versions")
    group.add_argument("--model_config_file", dest="tf_model_config_file", help="as --model-config-file")
    group.add_argument("--file_system_poll_wait_seconds", dest="tf_poll", type=float, help="as --poll-seconds")
    group.add_argument(
        "--enable_batching",
        dest="tf_enable_batching",
        type=_boolean,
        nargs="?",
        const=True,
        help="batch with TF Serving's timeout rule (default with these flags: off)",
    )
    group.add_argument(
        "--batching_parameters_file", dest="tf_batching_parameters_file", help="as --batching-parameters-file"
    )
    group.add_argument(
        "--monitoring_config_file",
        dest="tf_monitoring_config_file",
        help='MonitoringConfig text: prometheus_config { enable: true path: "..." }',
    )
    group.add_argument(
        "--rest_api_timeout_in_ms",
        dest="tf_rest_api_timeout_in_ms",
        type=int,
        help="a REST request's deadline (default: none, or X-Kiln-Timeout-Ms)",
    )


def screen(argv: Sequence[str]) -> list[str]:
    """argv without the TF Serving flags Kiln ignores (each warned about); a refused one raises."""
    kept, skip = [], False
    for index, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        name, has_value, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or (name not in IGNORED and name not in REFUSED):
            kept.append(arg)
            continue
        if not has_value and index + 1 < len(argv) and not argv[index + 1].startswith("-"):
            value, skip = argv[index + 1], True
        if name == "model_config_file_poll_wait_seconds":
            if float(value or 0) > 0:
                raise ConfigError(
                    f"--{name}: Kiln reads the model config file once; reload it with gRPC "
                    f"HandleReloadConfigRequest (kiln serve --reload)"
                )
        elif name == "enable_model_warmup":
            if value.lower() in _FALSE:
                raise ConfigError(f"--{name}=false: Kiln warms every version up before it serves it")
        elif name in REFUSED:
            raise ConfigError(f"--{name} is not supported: {REFUSED[name]}")
        else:
            log.warning("ignoring TensorFlow Serving's --%s: %s", name, IGNORED[name])
    return kept


def apply(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """Carry the TF Serving flags (and the image's variables) into Kiln's: sets args' ports and
    returns the Settings overrides they make."""
    given = {name: value for name, value in vars(args).items() if name.startswith("tf_") and value is not None}
    overrides: dict[str, Any] = {}
    if not _configured(args, given, environ) and (environ.get("MODEL_NAME") or environ.get("MODEL_BASE_PATH")):
        name = environ.get("MODEL_NAME") or "model"  # the tensorflow/serving image's defaults
        given |= {"tf_model_name": name, "tf_model_base_path": f"{environ.get('MODEL_BASE_PATH') or '/models'}/{name}"}
    if not given:
        return overrides
    if "tf_port" in given:
        args.grpc_port = given["tf_port"]
    if "tf_rest_api_port" in given:
        args.rest_port = given["tf_rest_api_port"]
    if "tf_model_base_path" in given:
        if args.model_repository or args.model_name:
            raise ConfigError("--model_base_path is TF Serving's BASE/NAME: give it, or --model-repository, not both")
        overrides |= {"model_base_path": given["tf_model_base_path"], "model_name": given.get("tf_model_name")}
    elif "tf_model_name" in given:
        raise ConfigError("--model_name needs --model_base_path (BASE/NAME), as in TF Serving")
    if "tf_model_config_file" in given:
        overrides["model_config_file"] = given["tf_model_config_file"]
    if "tf_poll" in given:
        overrides["poll_seconds"] = given["tf_poll"]
    if args.mode is None:  # Kiln's own --batching wins
        overrides["mode"] = "fixed" if given.get("tf_enable_batching") else "off"
    if "tf_batching_parameters_file" in given:
        if not given.get("tf_enable_batching") and args.mode is None:
            log.warning("--batching_parameters_file without --enable_batching: batching stays off, as in TF Serving")
        overrides["batching_parameters_file"] = given["tf_batching_parameters_file"]
    if "tf_monitoring_config_file" in given:
        overrides["metrics_paths"] = monitoring_paths(given["tf_monitoring_config_file"])
    if "tf_rest_api_timeout_in_ms" in given:
        if given["tf_rest_api_timeout_in_ms"] <= 0:
            raise ConfigError(f"--rest_api_timeout_in_ms must be positive, got {given['tf_rest_api_timeout_in_ms']}")
        overrides["rest_timeout_seconds"] = given["tf_rest_api_timeout_in_ms"] / 1000
    return overrides


def monitoring_paths(path: str) -> tuple[str, ...]:
    """The Prometheus paths a MonitoringConfig asks for: its path (TF Serving's default when empty),
    or none when prometheus_config is not enabled (TF Serving then exports nothing)."""
    from google.protobuf import text_format

    from runtime.protos import generated_module

    config = generated_module("kiln.monitoring_config_pb2").MonitoringConfig()
    try:
        with open(path) as f:
            text_format.Parse(f.read(), config)
    except (OSError, text_format.ParseError) as e:
        raise ConfigError(f"--monitoring_config_file {path}: {e}") from None
    prometheus = config.prometheus_config
    if not prometheus.enable:
        return ()
    return (prometheus.path or "/monitoring/prometheus/metrics",)


def _configured(args: argparse.Namespace, given: Mapping[str, Any], environ: Mapping[str, str]) -> bool:
    """Whether flags (TF Serving's or Kiln's) or Kiln's variables already name the models to serve."""
    return bool(
        args.model_repository
        or args.model_config_file
        or environ.get("KILN_MODEL_REPOSITORY")
        or environ.get("KILN_MODEL_CONFIG_FILE")
        or "tf_model_base_path" in given
        or "tf_model_config_file" in given
        or "tf_model_name" in given
    )


def _boolean(text: str) -> bool:
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")
