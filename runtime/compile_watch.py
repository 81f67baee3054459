"""Compile on publish: TF Serving users publish SavedModels as BASE/NAME/VERSION/saved_model.pb; each
new version is compiled into a Kiln servable at SERVABLE_BASE/NAME/VERSION and published there, so a
`kiln serve` polling SERVABLE_BASE swaps it in with no other step.

    kiln compile --watch SAVED_MODEL_BASE SERVABLE_BASE [--poll-seconds 2] [--once] [compile options]

Both bases are store URLs (a local path, s3://, gs://; runtime.storage). A version counts as published
on the SavedModel side once its saved_model.pb is there (write it last to an object store, as `aws
s3 cp` of a directory does not promise: upload the variables first; locally, write the directory
elsewhere and rename it into place, as for TF Serving). It is compiled when the servable side has no
manifest for it yet, newest version first (the one a `latest` policy serves). The servable never
appears half-written: on a local target it is compiled into a hidden directory beside its place and
renamed into place whole; on an object store its files are uploaded first and manifest.json last,
which is what publishes it (the repository skips versions without one). A version that fails to
compile is logged and tried again only once its SavedModel files change. The compile function
(handlers/compile_event.py) runs `kiln compile --watch --once --only NAME/VERSION` for one uploaded version.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from runtime.errors import StorageError
from runtime.storage import LocalStorage, Storage, open_storage

log = logging.getLogger(__name__)
SAVED_MODEL = "saved_model.pb"
MANIFEST = "manifest.json"


def compile_version(
    source: Storage,
    target: Storage,
    name: str,
    version: int,
    options: Mapping[str, Any],
    say: Callable[[str], None] = log.info,
) -> None:
    """Compile source's NAME/VERSION SavedModel into target's NAME/VERSION servable and publish it.
    `options`: runtime.compiler.compile.compile_servable's keywords (batch sizes, target CPU, ...)."""
    from runtime.compiler.compile import compile_servable

    key = f"{name}/{version}"
    with tempfile.TemporaryDirectory(prefix="kiln-compile-") as work:
        if isinstance(source, LocalStorage):
            saved_model = source.path(key)
        else:
            saved_model = Path(work) / "saved_model"
            for file in source.list_keys(key):
                dest = saved_model.joinpath(*file[len(key) + 1 :].split("/"))
                dest.parent.mkdir(parents=True, exist_ok=True)
                source.download(file, dest)
        if isinstance(target, LocalStorage):
            place = target.path(key)
            staging = place.with_name(f".{version}.compiling-{uuid.uuid4().hex[:8]}")  # not a version name
            try:
                compile_servable(saved_model, staging, name=name, version=version, **options)
                if place.exists():  # a directory left without its manifest: never published
                    shutil.rmtree(place)
                staging.rename(place)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        else:
            out = Path(work) / "servable"
            compile_servable(saved_model, out, name=name, version=version, **options)
            files = sorted(p for p in out.rglob("*") if p.is_file() and p.relative_to(out).as_posix() != MANIFEST)
            for path in files:
                target.write_bytes(f"{key}/{path.relative_to(out).as_posix()}", path.read_bytes())
            target.write_bytes(f"{key}/{MANIFEST}", (out / MANIFEST).read_bytes())
    say(f"published {target.url}/{key}")


class Watcher:
    """Polls a base of SavedModels and compiles every version the servable base lacks."""

    def __init__(self, source: str, target: str, options: Mapping[str, Any], *, say: Callable[[str], None] = log.info):
        self.source, self.target = open_storage(source), open_storage(target)
        self.options, self.say = dict(options), say
        self.failed: dict[tuple[str, int], tuple] = {}  # version -> its files when it failed

    def pending(self, only: tuple[str, int] | None = None) -> list[tuple[str, int]]:
        """Published SavedModel versions without a servable (of `only`, that one), newest first
        within each model."""
        found: list[tuple[str, int]] = []
        for name in [only[0]] if only else self.source.list_children():
            versions = (
                [only[1]]
                if only
                else sorted((int(v) for v in self.source.list_children(name) if v.isdigit()), reverse=True)
            )
            found.extend(
                (name, v)
                for v in versions
                if self.source.exists(f"{name}/{v}/{SAVED_MODEL}") and not self.target.exists(f"{name}/{v}/{MANIFEST}")
            )
        return found

    def run_once(self, only: tuple[str, int] | None = None) -> int:
        """Compile what is pending now (of `only`, that version); how many versions were published."""
        published = 0
        for name, version in self.pending(only):
            files = self._files(name, version)
            if self.failed.get((name, version)) == files:
                continue
            self.say(f"compiling {self.source.url}/{name}/{version}")
            started = time.monotonic()
            try:
                compile_version(self.source, self.target, name, version, self.options, self.say)
            except Exception as e:  # noqa: BLE001 -- one version's failure must not stop the watch
                self.failed[(name, version)] = files
                log.error(
                    "compiling %s/%s/%s failed (tried again when its files change): %s: %s",
                    self.source.url,
                    name,
                    version,
                    type(e).__name__,
                    e,
                )
                continue
            self.failed.pop((name, version), None)
            self.say(f"{name}/{version} compiled and published in {time.monotonic() - started:.1f} s")
            published += 1
        return published

    def run(self, poll_seconds: float) -> None:
        """Watch until interrupted."""
        self.say(f"watching {self.source.url} for new SavedModel versions; servables go to {self.target.url}")
        while True:
            try:
                self.run_once()
            except StorageError as e:  # a store that does not answer now may at the next poll
                log.error("watching %s: %s", self.source.url, e)
            time.sleep(poll_seconds)

    def _files(self, name: str, version: int) -> tuple:
        key = f"{name}/{version}"
        return tuple((file, self.source.stat(file).identity) for file in self.source.list_keys(key))
