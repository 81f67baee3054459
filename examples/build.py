"""Build the example SavedModels and compile each into a servable repository OUT_DIR/NAME/1.

    python examples/build.py OUT_DIR [--models digits,half_plus_two,mobilenet_v2,tiny_lm,wide_deep]
                                     [--batch-sizes 1,2,4,8,16,32]

Training and XLA compiles take minutes, so each example's SavedModel and servable are cached under
cache_root()/examples/NAME-KEY, KEY a hash of everything they are built from: the example's own
source files, the Kiln code a servable is built from (the compiler, the manifest, the saved-model
engine that prebuilds XLA caches), the TensorFlow version, the batch sizes and the name. A changed input gives a new key, so a stale entry is never used. Entries are built in
a temporary directory beside their final place and renamed into it whole, so an interrupted build
never leaves something that counts as a hit.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if not __package__:  # run as a script: import this checkout's runtime and examples
    sys.path.insert(0, str(REPO_ROOT))

from runtime.cache import cache_root  # noqa: E402

EXAMPLES_DIR = REPO_ROOT / "examples"
# The Kiln code whose changes change a built servable (serving code does not).
BUILT_FROM = ("runtime/compiler", "runtime/manifest.py", "runtime/record.py", "runtime/runtime_library.py", "runtime/warmup.py",
              "runtime/engines/saved_model.py", "runtime/engines/base.py", "runtime/host_program.py")
KEEP_ENTRIES = 2  # per example: the newest, and one more for switching back and forth
# Each example is the module examples.NAME, whose save(out, log) writes its SavedModel to `out`
# (and whose COMPILE_OPTIONS, if any, are more arguments of compile_servable: a stateful model's
# state pairing), and these are the files (under examples/) that it is built from.
SOURCES: dict[str, tuple[str, ...]] = {
    "digits": ("digits.py", "keras_export.py"),
    "half_plus_two": ("half_plus_two.py",),
    "mobilenet_v2": ("mobilenet_v2.py", "keras_export.py"),
    "tiny_lm": ("tiny_lm.py",),
    "wide_deep": ("wide_deep.py",),
}
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32)
VERSION = 1

Log = Callable[[str], None]


@dataclass(frozen=True)
class Example:
    """One built example. Tests run `saved_model` in TensorFlow and `servable` in Kiln, and compare."""

    name: str
    saved_model: Path
    servable: Path


def build_examples(out_dir: Path, models: Sequence[str] | None = None,
                   batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES, *, log: Log = print) -> dict[str, Example]:
    """Build (or take from the cache) each example and install its servable as OUT_DIR/NAME/1."""
    models = list(SOURCES) if models is None else list(models)
    unknown = [name for name in models if name not in SOURCES]
    if unknown:
        raise ValueError(f"unknown example(s) {', '.join(unknown)}; known: {', '.join(SOURCES)}")
    batch_sizes = tuple(sorted(set(batch_sizes)))
    return {name: build_example(name, Path(out_dir), batch_sizes, log) for name in models}


def build_example(name: str, out_dir: Path, batch_sizes: tuple[int, ...], log: Log) -> Example:
    key = cache_key(name, batch_sizes)
    entry = cache_root() / "examples" / key
    started = time.perf_counter()
    if entry.is_dir():
        log(f"{name}: cached ({entry})")
    else:
        entry.parent.mkdir(parents=True, exist_ok=True)
        with _locked(entry.parent / f".{key}.lock"):  # concurrent builds of one key wait for the first
            if not entry.is_dir():
                _build_entry(name, entry, batch_sizes, log)
                _prune(name, entry.parent)
    servable = out_dir / name / str(VERSION)
    _install(entry / "servable", servable)
    log(f"{name}: servable at {servable} ({time.perf_counter() - started:.1f} s)")
    return Example(name, entry / "saved_model", servable)


def cache_key(name: str, batch_sizes: tuple[int, ...]) -> str:
    """NAME-HASH over everything the cached SavedModel and servable are built from."""
    runtime_files = sorted(path for part in BUILT_FROM for path in [REPO_ROOT / part, *(REPO_ROOT / part).rglob("*")]
                           if path.suffix in (".py", ".cc") and path.is_file())
    digest = hashlib.sha256()
    for path in [*(EXAMPLES_DIR / source for source in SOURCES[name]), *runtime_files]:
        digest.update(f"{path.relative_to(REPO_ROOT)}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    digest.update(f"tensorflow {tensorflow_version()}\0batch sizes {list(batch_sizes)}\0{name}".encode())
    return f"{name}-{digest.hexdigest()[:16]}"


def tensorflow_version() -> str:
    """The installed TensorFlow's version, read from package metadata: importing it takes seconds."""
    from importlib.metadata import packages_distributions, version

    distributions = packages_distributions().get("tensorflow")
    if not distributions:
        raise RuntimeError("building the examples needs TensorFlow: pip install 'kiln[compile]'")
    return version(distributions[0])


def _build_entry(name: str, entry: Path, batch_sizes: tuple[int, ...], log: Log) -> None:
    """Export the SavedModel and compile it into a temporary directory, then rename it to `entry`."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from runtime.compiler.compile import compile_servable

    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.partial-", dir=entry.parent))
    try:
        started = time.perf_counter()
        example = importlib.import_module(f"examples.{name}")
        example.save(staging / "saved_model", log)
        log(f"{name}: SavedModel exported ({time.perf_counter() - started:.1f} s)")
        started = time.perf_counter()
        # Embedded: tests copy the examples anywhere, and run them in stand-ins for images that have no
        # runtime installed (runtime/runtime_library.py); the bucket libraries are the same either way.
        compile_servable(staging / "saved_model", staging / "servable", name=name, version=VERSION,
                         batch_sizes=batch_sizes, log=lambda message: log(f"{name}: {message}"),
                         embed_runtime=True, **getattr(example, "COMPILE_OPTIONS", {}))
        log(f"{name}: compiled for batch sizes {list(batch_sizes)} ({time.perf_counter() - started:.1f} s)")
        staging.rename(entry)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _prune(name: str, examples: Path) -> None:
    """Drop all but the newest KEEP_ENTRIES entries of one example: each code change makes one."""
    entries = sorted((p for p in examples.glob(f"{name}-*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    for old in entries[:-KEEP_ENTRIES]:
        shutil.rmtree(old, ignore_errors=True)


def _install(source: Path, target: Path) -> None:
    """Copy a servable to `target` beside it first, then swap it in, replacing an older copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        shutil.copytree(source, staging, dirs_exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="servable repository to write NAME/1 into")
    parser.add_argument("--models", default=",".join(SOURCES), help="comma-separated example names")
    parser.add_argument("--batch-sizes", default=",".join(map(str, DEFAULT_BATCH_SIZES)),
                        help="comma-separated batch buckets")
    args = parser.parse_args(argv)
    models = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = [name for name in models if name not in SOURCES]
    if unknown:
        parser.error(f"unknown example(s) {', '.join(unknown)}; known: {', '.join(SOURCES)}")
    try:
        batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    except ValueError:
        parser.error(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")
    if min(batch_sizes) < 1:
        parser.error(f"--batch-sizes must be positive, got {args.batch_sizes!r}")
    build_examples(args.out_dir, models, batch_sizes)


if __name__ == "__main__":
    main()
