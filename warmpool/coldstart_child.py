"""The measured side of `kiln coldstart`, run by warmpool.coldstart in a fresh interpreter.

It loads one servable the way the repository does (runtime.repository: fetch through the servable
cache -> Engine.open, verifying unless the cache verified it -> warm_up), then runs one request, and
prints one JSON line of time.perf_counter() checkpoints (CLOCK_MONOTONIC, one clock for the whole
machine, so the parent can set them against the moment it spawned this process). Only the standard
library is imported before the first checkpoint is taken by the caller's first line.

Verification is timed by wrapping runtime.manifest.verify_files where the engine looks it up, which
changes nothing it does: the engine verifies what it opens in place. The servable cache hashes what
it downloads as the bytes arrive, inside the fetch: that hashing is timed through the sha256 objects
runtime.storage makes, summed over the download threads, and counted as verification, not fetch.
"""

import json
import os
import sys
import time


def main(started: float) -> None:
    target, cache_dir, signature_key = json.loads(sys.argv[1])
    marks = {"main": started}
    verified_for: dict[str, float] = {"fetch": 0.0, "open": 0.0}
    phase = ["fetch"]

    from pathlib import Path

    import numpy  # noqa: F401  (the thin runtime's one heavy dependency, imported as serving imports it)

    import runtime.engines.base as engine_module
    import runtime.objects as objects_module  # its downloads hash as they arrive
    from runtime.engines.base import Engine, synthetic_inputs
    from runtime.errors import KilnError
    from runtime.repository import warm_up
    from runtime.servable_cache import FetchedServable, ServableCache
    from runtime.storage import open_storage, split_location

    if target.startswith(("s3://", "gs://")):
        import boto3  # noqa: F401  (what opening the store imports)
    marks["imports"] = time.perf_counter()

    def timed(verify):
        def verify_files(*args, **kwargs):
            begun = time.perf_counter()
            try:
                return verify(*args, **kwargs)
            finally:
                verified_for[phase[0]] += time.perf_counter() - begun

        return verify_files

    engine_module.verify_files = timed(engine_module.verify_files)
    objects_module.hashlib = _TimedHashlib(verified_for)  # type: ignore[assignment]  # timed stand-in
    try:
        base_path, _, last = target.rstrip("/").rpartition("/")
        version = int(last) if last.isdigit() else None
        if version is None and "://" not in target and (Path(target) / "manifest.json").is_file():
            fetched = FetchedServable(Path(target), verified=False)  # a servable outside any repository
        else:
            parent, name = split_location(base_path if version is not None else target)
            storage = open_storage(parent)
            if version is None:  # BASE/NAME: its newest published version
                published = [
                    int(n)
                    for n in storage.list_children(name)
                    if n.isdigit() and storage.exists(f"{name}/{n}/manifest.json")
                ]
                if not published:
                    raise KilnError(f"{target} has no published version")
                version = max(published)
            fetched = ServableCache(root=Path(cache_dir)).fetch(storage, name, version)
        marks["fetched"] = time.perf_counter()
        phase[0] = "open"
        engine = Engine.open(fetched.directory, verify=not fetched.verified)
        marks["opened"] = time.perf_counter()
        warm_up(engine, depth="all" if os.environ.get("KILN_WARMUP") == "all" else "first")  # as serving does
        marks["warmed"] = time.perf_counter()
        key = signature_key or _default_signature(engine)
        signature = engine.signature(key)
        engine.run(key, synthetic_inputs(signature, 1 if signature.batched else 0))
        marks["answered"] = time.perf_counter()
    except KilnError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    manifest = engine.manifest
    with open("/proc/self/status") as status:
        peak = next((int(line.split()[1]) for line in status if line.startswith("VmHWM")), 0)
    print(
        json.dumps(
            {
                "marks": marks,
                "verification": verified_for,
                "peak_rss_kib": peak,
                "directory": str(fetched.directory),
                "servable": {
                    "name": manifest.name,
                    "version": manifest.version,
                    "engine": manifest.engine,
                    "signature": key,
                    "files": len(manifest.files),
                    "bytes": sum(entry.size for entry in manifest.files.values()),
                },
            }
        ),
        flush=True,
    )


class _TimedHashlib:
    """hashlib for runtime.storage, whose sha256 objects add the time of each update to the fetch's
    verification (a lock keeps the download threads' sums whole)."""

    def __init__(self, verified_for: dict[str, float]):
        import hashlib
        import threading

        self._hashlib, self._verified_for, self._lock = hashlib, verified_for, threading.Lock()

    def sha256(self):
        digest, timed = self._hashlib.sha256(), self

        class Timed:
            def update(self, data) -> None:
                begun = time.perf_counter()
                digest.update(data)
                with timed._lock:
                    timed._verified_for["fetch"] += time.perf_counter() - begun

            def hexdigest(self) -> str:
                return digest.hexdigest()

        return Timed()


def _default_signature(engine) -> str:
    """serving_default, else the first signature a request can be synthesized for (no string inputs)."""
    usable = [key for key, sig in engine.signatures.items() if all(spec.dtype != "string" for spec in sig.inputs)]
    if not usable:
        from runtime.errors import KilnError

        raise KilnError("every signature takes strings: no request can be synthesized; pass --signature")
    from runtime.codecs.tfserving import DEFAULT_SIGNATURE

    return DEFAULT_SIGNATURE if DEFAULT_SIGNATURE in usable else usable[0]
