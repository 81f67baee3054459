"""The model repository: which versions of which models are served, and each version's lifecycle.

As TensorFlow Serving's core does it: a poll of each model's base path finds its published
versions (a version directory counts once its manifest.json is there: publishers write it last) and
the model's version policy picks the aspired ones; the pure availability-preserving policy then
says, one action at a time, which version to load or unload; loads run fetch -> open -> warm-up
before a version turns AVAILABLE, so a new version takes traffic only when ready. Requests hold a
ServableHandle, and a version being replaced finishes the requests holding it before it unloads.
A version that fails to load shows ERROR with its message and never takes traffic; the version
serving before keeps serving.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

from runtime.engines.base import Engine
from runtime.errors import ConfigError, InvalidInput, KilnError, NotFound
from runtime.model_config import ModelConfig, ModelConfigList, check_version_labels
from runtime.servable_cache import FetchedServable, NotPublished, ServableCache
from runtime.storage import Retry, Storage, open_storage, split_location
from runtime.version_policy import (
    Load,
    Specific,
    State,
    Unload,
    VersionSnapshot,
    aspired_versions,
    availability_preserving,
    missing_versions,
)
from runtime.warmup import WarmupDepth, warm_up

log = logging.getLogger(__name__)
DEFAULT_POLL_SECONDS = 1.0


@dataclass
class Version:
    """One version of one model as the repository tracks it."""

    number: int
    state: State = State.START
    aspired: bool = True
    error: str = ""
    engine: Engine | None = None
    fetched: FetchedServable | None = None
    in_flight: int = 0
    load_seconds: float = 0.0  # fetch, verify and open, of the last load
    warmup_seconds: float = 0.0


@dataclass
class ServedModel:
    config: ModelConfig
    storage: Storage
    directory: str  # the base path's last component: versions are storage/directory/VERSION
    versions: dict[int, Version] = field(default_factory=dict)
    error: str = ""  # why the last poll failed, shown in status until a poll succeeds
    missing: frozenset[int] = frozenset()  # versions its specific policy names that storage lacks (warned once)


@dataclass(frozen=True)
class VersionStatus:
    version: int
    state: State
    error: str
    load_seconds: float = 0.0
    warmup_seconds: float = 0.0


@dataclass(frozen=True)
class ModelStatus:
    """What GetModelStatus reports: every version's state (newest first), and why the model's
    store could not be read at the last poll, if it could not ("" otherwise)."""

    name: str
    versions: list[VersionStatus]
    error: str


@dataclass(frozen=True)
class ServableHandle:
    """A version held for one request: it cannot unload until the handle is released."""

    name: str
    version: int
    engine: Engine
    held: Version = field(repr=False, compare=False)


class Repository:
    """Serves the models of a ModelConfigList; safe to use from many threads."""

    def __init__(
        self,
        config: ModelConfigList,
        *,
        poll_seconds: float = DEFAULT_POLL_SECONDS,
        cache: ServableCache | None = None,
        threads: int | None = None,
        retry: Retry = Retry(),
        warmup_iterations: int = 1,
        warmup: WarmupDepth = "first",
    ):
        self.poll_seconds = poll_seconds
        self.warmup_iterations = warmup_iterations
        self.warmup = warmup
        self.retry = retry
        self.cache = cache or ServableCache()
        self.threads = threads
        self._lock = threading.Condition()
        self._models: dict[str, ServedModel] = {}
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._apply_config(config)

    # Lifecycle of the repository itself -------------------------------------------------------

    def start(self) -> None:
        """Poll once and load what is aspired (so the caller starts serving with its models
        loaded), then keep polling in the background unless poll_seconds says otherwise:
        0 polls only this once, a negative value never polls (TF Serving's meaning)."""
        if self.poll_seconds < 0:
            return
        self.poll()
        if self.poll_seconds > 0:
            self._poller = threading.Thread(target=self._poll_forever, name="kiln-repository", daemon=True)
            self._poller.start()

    def stop(self) -> None:
        """Stop polling and unload every version once its requests are done."""
        self._stop.set()
        if self._poller is not None:
            self._poller.join()
        with self._lock:
            models = list(self._models.values())
            for model in models:
                for version in model.versions.values():
                    version.aspired = False
        for model in models:
            self._step(model)

    def reload(self, config: ModelConfigList) -> None:
        """Replace the model list at run time (ModelService.HandleReloadConfigRequest): new models
        load, removed ones unload, and labels must point to AVAILABLE versions as in TF Serving."""
        with self._lock:
            for model_config in config.models:
                current = self._models.get(model_config.name)
                available = (
                    {v.number for v in current.versions.values() if v.state is State.AVAILABLE} if current else set()
                )
                labels = current.config.version_labels if current else {}
                check_version_labels(model_config, available, labels)
            self._apply_config(config)
        self.poll()

    def _apply_config(self, config: ModelConfigList) -> None:
        with self._lock:
            for name in set(self._models) - {m.name for m in config.models}:
                for version in self._models[name].versions.values():  # unloaded by the next poll
                    version.aspired = False
            for model_config in config.models:
                current = self._models.get(model_config.name)
                if current and current.config.base_path == model_config.base_path:
                    current.config = model_config
                else:
                    parent, directory = split_location(model_config.base_path)
                    self._models[model_config.name] = ServedModel(
                        model_config, open_storage(parent, retry=self.retry), directory
                    )
            self._configured = {m.name for m in config.models}

    # Polling and the policy --------------------------------------------------------------------

    def _poll_forever(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            self.poll()

    def poll(self) -> None:
        """Find each model's published versions, mark the aspired ones, and act on them."""
        with self._lock:
            models = list(self._models.values())
        for model in models:
            if model.config.name in self._configured:
                self._discover(model)
            self._step(model)

    def _discover(self, model: ServedModel) -> None:
        try:
            names = model.storage.list_children(model.directory)
            published = {
                int(n) for n in names if n.isdigit() and model.storage.exists(f"{model.directory}/{n}/manifest.json")
            }
            hint = "" if published else _saved_models_hint(model, names)
        except KilnError as e:
            with self._lock:
                model.error = f"cannot read versions of model {model.config.name}: {e}"
            log.warning(model.error)
            return
        policy = model.config.version_policy
        aspired = aspired_versions(policy, published)
        missing = frozenset(missing_versions(policy, published))
        if missing and missing != model.missing:  # as TF Serving: warned, and the others served
            log.warning(
                "model %s: versions %s of its specific version policy are not in storage; serving the others",
                model.config.name,
                ", ".join(map(str, sorted(missing))),
            )
        with self._lock:
            if hint and hint != model.error:
                log.warning(hint)
            model.error, model.missing = hint, missing
            for number in aspired - set(model.versions):
                model.versions[number] = Version(number)
            for version in model.versions.values():
                version.aspired = version.number in aspired
                if version.aspired and version.state is State.END:
                    self._set(version, State.START)  # published again after it was removed

    def _step(self, model: ServedModel) -> None:
        """Carry out the policy's actions for one model until it has none left."""
        while True:
            with self._lock:
                snapshot = [VersionSnapshot(v.number, v.state, v.aspired) for v in model.versions.values()]
                policy = model.config.version_policy
                pinned = frozenset(policy.versions) if isinstance(policy, Specific) else frozenset()
                action = availability_preserving(snapshot, pinned)
                if action is None:
                    return
                version = model.versions[action.version]
                self._set(version, State.LOADING if isinstance(action, Load) else State.UNLOADING)
            if isinstance(action, Load):
                self._load(model, version)
            elif isinstance(action, Unload):
                self._unload(version)

    def _load(self, model: ServedModel, version: Version) -> None:
        started = time.perf_counter()
        fetched = None
        try:
            fetched = self.cache.fetch(model.storage, model.directory, version.number)
            engine = Engine.open(fetched.directory, verify=not fetched.verified, threads=self.threads)
            opened = time.perf_counter()
            try:
                warm_up(engine, self.warmup_iterations, self.warmup)
            except BaseException:
                engine.close()
                raise
        except NotPublished:  # withdrawn between the listing and the fetch: try again next poll
            with self._lock:
                self._set(version, State.START)
            return
        except Exception as e:  # whatever broke, the version fails and the repository carries on
            if fetched is not None:
                self.cache.release(fetched.directory)
            message = str(e) if isinstance(e, KilnError) else f"unexpected {type(e).__name__}: {e}"
            with self._lock:
                self._set(version, State.ERROR, message)
            log.error(
                "model %s version %d failed to load: %s",
                model.config.name,
                version.number,
                message,
                exc_info=not isinstance(e, KilnError),
            )
            return
        warmed = time.perf_counter()
        with self._lock:
            version.engine, version.fetched = engine, fetched
            version.load_seconds, version.warmup_seconds = opened - started, warmed - opened
            self._set(version, State.AVAILABLE)
        log.info(
            "model %s version %d AVAILABLE in %.2f s (warm-up %.2f s)",
            model.config.name,
            version.number,
            warmed - started,
            warmed - opened,
        )

    def _unload(self, version: Version) -> None:
        """Wait for the requests holding the version, then release it."""
        with self._lock:
            while version.in_flight:
                self._lock.wait()
            engine, fetched = version.engine, version.fetched
            version.engine = version.fetched = None
        if engine is not None:
            engine.close()
        if fetched is not None:
            self.cache.release(fetched.directory)
        with self._lock:
            self._set(version, State.END)

    def _set(self, version: Version, state: State, error: str = "") -> None:
        """Change a version's state (the lock held) and wake whoever waits for one."""
        version.state, version.error = state, error
        self._lock.notify_all()

    # Serving ----------------------------------------------------------------------------------

    @contextmanager
    def hold(self, name: str, version: int | None = None, label: str | None = None) -> Iterator[ServableHandle]:
        """Hold a version for a request: the one asked for, the label's, or the newest AVAILABLE."""
        with self._lock:
            model = self._models.get(name)
            if model is None or name not in self._configured:
                raise NotFound(f"Servable not found for request: model {name!r} is not served")
            if label is not None:
                if label not in model.config.version_labels:
                    raise InvalidInput(f"model {name!r} has no version label {label!r}")
                version = model.config.version_labels[label]
            chosen = self._available(model, version)
            chosen.in_flight += 1
        try:
            assert chosen.engine is not None  # an AVAILABLE version has its engine
            yield ServableHandle(name, chosen.number, chosen.engine, chosen)
        finally:
            self._release(chosen)

    def retain(self, handle: ServableHandle) -> Callable[[], None]:
        """Hold a held version once more, until the returned function is called: for model work
        that may outlive the request that started it (one that gave up at its deadline), so the
        version never unloads under running code."""
        with self._lock:
            handle.held.in_flight += 1
        return partial(self._release, handle.held)

    def _release(self, version: Version) -> None:
        with self._lock:
            version.in_flight -= 1
            if not version.in_flight:
                self._lock.notify_all()

    @staticmethod
    def _available(model: ServedModel, number: int | None) -> Version:
        available = [v for v in model.versions.values() if v.state is State.AVAILABLE]
        if number is None:
            if not available:
                raise NotFound(
                    f"Servable not found for request: no version of model {model.config.name!r} is available"
                )
            return max(available, key=lambda v: v.number)
        for version in available:
            if version.number == number:
                return version
        raise NotFound(f"Servable not found for request: model {model.config.name!r} version {number} is not available")

    def names(self) -> list[str]:
        """The models the configuration lists."""
        with self._lock:
            return sorted(self._configured)

    def named_or_only(self, name: str | None) -> str:
        """`name`, if it is served, else the only model served: what a record or a scoring run that
        names no model is for."""
        names = self.names()
        if name:
            if name not in names:
                raise NotFound(f"model {name!r} is not served; served: {', '.join(names) or 'none'}")
            return name
        if len(names) == 1:
            return names[0]
        if not names:
            raise ConfigError("no model is served, so there is nothing to score with")
        raise ConfigError(
            f"several models are served ({', '.join(names)}); name the one to score with "
            f"(KILN_SCORE_MODEL, or kiln score --model)"
        )

    def config_of(self, name: str) -> ModelConfig:
        """The model's configuration as it stands."""
        with self._lock:
            model = self._models.get(name)
            if model is None:
                raise NotFound(f"model {name!r} is not configured")
            return model.config

    def is_available(self, name: str) -> bool:
        """Whether some version of the model can take a request now."""
        with self._lock:
            model = self._models.get(name)
            return model is not None and any(v.state is State.AVAILABLE for v in model.versions.values())

    def status(self, name: str, version: int | None = None) -> ModelStatus:
        """The model's versions (or the one asked for) with their states and errors."""
        with self._lock:
            model = self._models.get(name)
            if model is None:
                raise NotFound(f"model {name!r} is not configured")
            versions = [
                VersionStatus(v.number, v.state, v.error, v.load_seconds, v.warmup_seconds)
                for v in model.versions.values()
                if version is None or v.number == version
            ]
            if not versions:
                reason = (
                    f"version {version} of model {name!r} was not found"
                    if version is not None
                    else f"model {name!r} has no versions yet"
                )
                raise NotFound(f"{reason}: {model.error}" if model.error else reason)
            return ModelStatus(name, sorted(versions, key=lambda s: -s.version), model.error)

    def wait_for(self, name: str, version: int, state: State, timeout: float) -> bool:
        """Block until the version reaches `state` (for start-up and tests); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                model = self._models.get(name)
                current = model.versions.get(version) if model else None
                if current is not None and current.state is state:
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._lock.wait(remaining)


def _saved_models_hint(model: ServedModel, names: list[str]) -> str:
    """What to run when a model's base path holds SavedModels (TF Serving's layout) and no servable."""
    versions = sorted((int(n) for n in names if n.isdigit()), reverse=True)
    if not versions or not model.storage.exists(f"{model.directory}/{versions[0]}/saved_model.pb"):
        return ""
    return (
        f"{model.storage.url}/{model.directory}/{versions[0]} holds a SavedModel, not a Kiln servable: "
        f"compile the versions as they are published with `kiln compile --watch {model.storage.url} "
        f"SERVABLE_BASE` and serve SERVABLE_BASE (README: Compiling on publish)"
    )
