"""Server settings from the environment, the same for every entry point: `kiln serve` (whose flags
override them), the Lambda handler and the Cloud Run service and job. They are read and checked
once, at start-up (Lambda: in the init phase), so a wrong setting fails the start with a message
naming the variable, never a request.

    KILN_MODEL_CONFIG_FILE    a models.config (text), YAML or JSON: a local path or s3://bucket/key
    KILN_MODEL_REPOSITORY     BASE holding NAME/VERSION (a path or s3://bucket/prefix); with
    KILN_MODEL_NAME           one model, BASE/NAME; without it every NAME under BASE
    KILN_POLL_SECONDS         how often to look for new versions (default 1; 0 once; negative never)
    KILN_BATCHING             adaptive | fixed | off (the entry point's default otherwise)
    KILN_BATCHING_PARAMETERS_FILE  TF Serving's batching parameters file
    KILN_MAX_BATCH_SIZE, KILN_BATCH_TIMEOUT_MICROS, KILN_MAX_ENQUEUED_BATCHES, KILN_NUM_BATCH_THREADS,
    KILN_ALLOWED_BATCH_SIZES (comma-separated), KILN_PAD_VARIABLE_LENGTH_INPUTS,
    KILN_ENABLE_LARGE_BATCH_SPLITTING (true/false)
    KILN_API_KEYS             TENANT:KEY or KEY, comma-separated (runtime.access)
    KILN_ADMIN_KEYS           NAME:KEY or KEY, comma-separated: administrators, who alone may reload the
                              model configuration (gRPC HandleReloadConfigRequest); never also a tenant's key
    KILN_RELOAD               who may reload: admin (default: an administrator's key; with none configured,
                              nobody), off (nobody), open (anyone reaching the port, as TF Serving; refused
                              with KILN_API_KEYS). `kiln serve --reload` overrides it
    KILN_RELOAD_BASE_PATHS    comma-separated local paths or URLs a reload's base_paths must be under
                              (default: the parent of each base_path configured at start-up; a refusal is
                              PERMISSION_DENIED naming the path and these roots)
    KILN_CORS_ORIGINS         * or comma-separated origins
    KILN_MAX_BODY_BYTES       request body limit (default 64 MiB); also gRPC's largest request message
    `kiln serve`'s connections (handlers.connections; Lambda and Cloud Run have their own front ends):
    KILN_HEADER_TIMEOUT_SECONDS  a request's headers must all arrive within this from its first byte, and a
                              new connection must send one within it (default 30: a client on a slow mobile
                              link sends headers in well under that; slowloris and idle sockets are closed).
                              Also gRPC's handshake timeout
    KILN_BODY_TIMEOUT_SECONDS each stretch of a body must arrive within this of the last (default 60, nginx's
                              client_body_timeout: a 100 MiB body promised and not sent is answered 408)
    KILN_KEEPALIVE_TIMEOUT_SECONDS  how long a connection may idle between requests (REST) or calls (gRPC's
                              max connection idle) (default 620: longer than the idle timeout of the balancer
                              in front, AWS ALB 60 s and Google's 600 s, so that it closes first and never
                              sends a request into a connection Kiln is closing, a 502)
    KILN_MAX_CONNECTIONS      REST connections open at once, and gRPC calls in flight, beyond which requests
                              get 503 / RESOURCE_EXHAUSTED (default 2000: twice Cloud Run's largest
                              concurrency of 1000; each costs a socket and some memory; 0: no cap)
    KILN_WORKERS              `kiln serve`'s worker processes sharing its ports (handlers.supervisor; default 0:
                              as many as the CPUs this process may run on; 1: one process, no supervisor)
    KILN_LOG_LEVEL            default INFO
    KILN_ACCESS_LOG           true: a JSON line per request (default false)
    KILN_WARMUP_ITERATIONS    how often each warm-up request is replayed at each bucket (default 1)
    KILN_WARMUP               first: AVAILABLE after the servable's warm-up requests, else one call at the
                              smallest bucket, other buckets warm on first use (default); all: every
                              request and signature at every bucket first (runtime/warmup.py)
    KILN_REDIS_URL            where agent sessions live: redis://, rediss://, unix:// (Redis 7 or Valkey);
                              unset: in this process
    KILN_SESSION_KEY          the key binding session ids to tenants (runtime.sessions.ids); required with
                              KILN_REDIS_URL, where every instance must share it
    KILN_SESSION_TTL_SECONDS  how long an untouched session lives (default 3600)
    KILN_PREDICTION_CACHE_SECONDS  cache stateless predictions this long in the same store (default: off)
    KILN_OUTPUT_PREFIX        where batch scoring writes results (s3://bucket/prefix, gs://..., a path)
    KILN_SCORE_MODEL          the model batch scoring and queue records use (default: the only one)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from runtime.access import Auth, Cors
from runtime.batching import BatchingParameters, server_parameters
from runtime.errors import ConfigError
from runtime.model_config import ModelConfig, ModelConfigList

if TYPE_CHECKING:
    from runtime.warmup import WarmupDepth

DEFAULT_MAX_BODY_BYTES = 64 << 20
_CONNECTION_LIMITS = {
    "header_timeout_seconds": float,
    "body_timeout_seconds": float,
    "keepalive_timeout_seconds": float,
    "max_connections": int,
}
_INTEGERS = ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads")
_BOOLEANS = ("pad_variable_length_inputs", "enable_large_batch_splitting")


@dataclass(frozen=True)
class Settings:
    model_config_file: str | None = None
    model_repository: str | None = None
    model_name: str | None = None
    poll_seconds: float = 1.0
    batching: BatchingParameters = field(default_factory=BatchingParameters)
    auth: Auth = Auth()
    cors: Cors = Cors()
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    log_level: str = "INFO"
    access_log: bool = False
    warmup_iterations: int = 1
    warmup: WarmupDepth = "first"
    redis_url: str | None = None
    session_ttl_seconds: float | None = None
    prediction_cache_seconds: float | None = None
    output_prefix: str | None = None
    score_model: str | None = None
    header_timeout_seconds: float = 30.0
    body_timeout_seconds: float = 60.0
    keepalive_timeout_seconds: float = 620.0
    max_connections: int = 2000
    workers: int = 0  # 0: the CPUs this process may run on
    model_base_path: str | None = None  # TF Serving's --model_base_path (BASE/NAME; runtime.tfserving_flags)
    metrics_paths: tuple[str, ...] | None = None  # Prometheus paths (None: runtime.app's); a monitoring config's
    rest_timeout_seconds: float | None = None  # a REST request's deadline when it asks for none (TF Serving's flag)

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] = os.environ,
        *,
        batching_mode: str = "adaptive",
        overrides: Mapping[str, Any] | None = None,
    ) -> Settings:
        """Settings from `environ`, then `overrides` (flags given, None for those not given) on top.
        `batching_mode`: the entry point's default when KILN_BATCHING says nothing."""
        given = {key: value for key, value in (overrides or {}).items() if value is not None}
        env = _Env(environ)
        batching_flags: dict[str, Any] = {name: env.integer(f"KILN_{name.upper()}") for name in _INTEGERS}
        batching_flags |= {name: env.boolean(f"KILN_{name.upper()}") for name in _BOOLEANS}
        batching_flags["allowed_batch_sizes"] = env.sizes("KILN_ALLOWED_BATCH_SIZES")
        batching_flags["mode"] = env.choice("KILN_BATCHING", ("adaptive", "fixed", "off")) or batching_mode
        batching_flags |= {name: given.pop(name) for name in [*batching_flags] if name in given}
        batching = server_parameters(
            given.pop("batching_parameters_file", env.get("KILN_BATCHING_PARAMETERS_FILE")), batching_flags
        )
        poll = env.number("KILN_POLL_SECONDS")
        max_body = env.integer("KILN_MAX_BODY_BYTES")
        iterations = env.integer("KILN_WARMUP_ITERATIONS")
        workers = env.integer("KILN_WORKERS")
        limits: dict[str, Any] = {
            name: (env.integer if kind is int else env.number)(f"KILN_{name.upper()}")
            for name, kind in _CONNECTION_LIMITS.items()
        }
        settings = cls(
            model_config_file=env.get("KILN_MODEL_CONFIG_FILE"),
            model_repository=env.get("KILN_MODEL_REPOSITORY"),
            model_name=env.get("KILN_MODEL_NAME"),
            poll_seconds=1.0 if poll is None else poll,
            batching=batching,
            auth=Auth.from_env(environ),
            cors=Cors.parse(env.get("KILN_CORS_ORIGINS")),
            max_body_bytes=DEFAULT_MAX_BODY_BYTES if max_body is None else max_body,
            log_level=env.get("KILN_LOG_LEVEL") or "INFO",
            access_log=bool(env.boolean("KILN_ACCESS_LOG")),
            warmup_iterations=1 if iterations is None else iterations,
            warmup=cast("WarmupDepth", env.choice("KILN_WARMUP", ("first", "all")) or "first"),
            redis_url=env.get("KILN_REDIS_URL"),
            session_ttl_seconds=env.number("KILN_SESSION_TTL_SECONDS"),
            prediction_cache_seconds=env.number("KILN_PREDICTION_CACHE_SECONDS"),
            output_prefix=env.get("KILN_OUTPUT_PREFIX"),
            score_model=env.get("KILN_SCORE_MODEL"),
            workers=workers or 0,
            **{name: value for name, value in limits.items() if value is not None},
        )
        if "cors_origins" in given:
            given["cors"] = Cors.parse(given.pop("cors_origins"))
        if "reload" in given:
            given["auth"] = replace(settings.auth, reload=replace(settings.auth.reload, policy=given.pop("reload")))
        settings = cls(**{**settings.__dict__, **given})
        settings.check()
        if settings.redis_url:  # instances sharing a store must share the key of its session ids
            from runtime.sessions.ids import SessionIds

            SessionIds.from_env(environ, shared=True)
        return settings

    def check(self) -> None:
        if self.model_base_path:  # TF Serving's one model: --model_name names it
            if self.model_config_file or self.model_repository:
                raise ConfigError("give --model_base_path, a model config file or a model repository, not two")
            return self._check_limits()
        if self.model_config_file and self.model_repository:
            raise ConfigError(
                "give a model config file (KILN_MODEL_CONFIG_FILE, --model-config-file) or a model "
                "repository (KILN_MODEL_REPOSITORY, --model-repository), not both"
            )
        if not self.model_config_file and not self.model_repository:
            raise ConfigError(
                "no models to serve: set KILN_MODEL_CONFIG_FILE (a models.config, local or s3://) "
                "or KILN_MODEL_REPOSITORY (with KILN_MODEL_NAME for one model), or pass "
                "--model-config-file or --model-repository"
            )
        if self.model_name and not self.model_repository:
            raise ConfigError("KILN_MODEL_NAME names a model in KILN_MODEL_REPOSITORY, which is not set")
        self._check_limits()

    def _check_limits(self) -> None:
        if self.warmup_iterations < 1:
            raise ConfigError(f"KILN_WARMUP_ITERATIONS must be at least 1, got {self.warmup_iterations}")
        if self.max_body_bytes < 1:
            raise ConfigError(f"the request body limit must be positive, got {self.max_body_bytes}")
        for name in ("header_timeout_seconds", "body_timeout_seconds", "keepalive_timeout_seconds"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"KILN_{name.upper()} must be positive, got {getattr(self, name)}")
        if self.workers < 0:
            raise ConfigError(f"KILN_WORKERS must be 1 or more (0: one per CPU), got {self.workers}")
        if self.max_connections < 0:
            raise ConfigError(f"KILN_MAX_CONNECTIONS must be 0 (no cap) or more, got {self.max_connections}")
        self.auth.check()

    def model_config(self) -> ModelConfigList:
        """The models to serve: the config file's, the one named, or every NAME in the repository."""
        from runtime.storage import open_storage

        if self.model_base_path:
            from runtime.model_config import single_model

            return single_model(self.model_name or "default", self.model_base_path)  # TF Serving's default name
        if self.model_config_file:
            from runtime.model_config import load_model_config

            return load_model_config(self.model_config_file)
        base = (self.model_repository or "").rstrip("/")  # set: checked at start-up
        if "://" not in base:
            base = str(Path(base).resolve())
        names = [self.model_name] if self.model_name else open_storage(base).list_children("")
        if not names:
            raise ConfigError(f"no models in {base}: expected NAME/VERSION directories")
        return ModelConfigList(models=tuple(ModelConfig(name=name, base_path=f"{base}/{name}") for name in names))


class _Env:
    """Typed reads of environment variables; a ConfigError names the variable and the value."""

    def __init__(self, environ: Mapping[str, str]):
        self.environ = environ

    def get(self, name: str) -> str | None:
        value = self.environ.get(name, "").strip()
        return value or None

    def integer(self, name: str) -> int | None:
        return self._typed(name, int, "an integer")

    def number(self, name: str) -> float | None:
        return self._typed(name, float, "a number")

    def boolean(self, name: str) -> bool | None:
        value = self.get(name)
        if value is None:
            return None
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name} must be true or false, got {value!r}")

    def choice(self, name: str, choices: tuple[str, ...]) -> str | None:
        value = self.get(name)
        if value is not None and value not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        return value

    def sizes(self, name: str) -> tuple[int, ...] | None:
        value = self.get(name)
        if value is None:
            return None
        try:
            return tuple(int(part) for part in value.split(",") if part.strip())
        except ValueError:
            raise ConfigError(f"{name} must be comma-separated integers, got {value!r}") from None

    def _typed(self, name: str, kind, what: str):
        value = self.get(name)
        if value is None:
            return None
        try:
            return kind(value)
        except ValueError:
            raise ConfigError(f"{name} must be {what}, got {value!r}") from None
