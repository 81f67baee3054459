"""Where a servable's shared runtime library comes from, and the check that it is the one named.

Every bucket library of a format 2 or 3 servable needs libkiln_runtime-KEY.so: the XLA AOT runtime and
Kiln's kernels, KEY naming the TensorFlow version, compiler, flags, target CPU and kernels it was
built from (runtime/compiler/toolchain.py), so that equal keys mean interchangeable libraries. Format 2
ships it in the servable. Format 3 (the default of `kiln compile`) names it in the manifest (key,
sha256, size) and the library is found, in this order:

1. installed: KEY/FILE under each directory of KILN_RUNTIME_PATH (':'-separated: an image puts its
   runtimes there), then under the cache directory's runtime/ (`kiln compile` installs every runtime
   it links there, so servables compiled on a machine run on it);
2. once per store, beside the servables: BASE/.kiln/runtime/KEY/FILE, which `kiln compile` writes when
   its output is BASE/NAME/VERSION; the servable cache fetches it from a remote store once, checked
   as it arrives, into the same place under its copy of the store (runtime/servable_cache.py);
3. or, compiled with --embed-runtime (format 2), only in the servable itself, checked with its files.

Whichever copy is found must have the manifest's size and sha256 (checked once per process per file)
before it is loaded; the bucket libraries then find it loaded by its soname, which is its file name.
A servable whose runtime is nowhere gets a ServableError naming the key and every place looked.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import threading
import uuid
from pathlib import Path

from runtime.cache import cache_root
from runtime.errors import ServableError
from runtime.manifest import SharedRuntime, sha256_of

PATH_ENV = "KILN_RUNTIME_PATH"
STORE_DIR = (".kiln", "runtime")  # under a store's root: BASE/.kiln/runtime/KEY/FILE

_lock = threading.Lock()
_verified: dict[tuple[str, int, int, int], str] = {}  # (path, device, inode, mtime) -> sha256
_loaded: dict[str, ctypes.CDLL] = {}  # key -> the library, loaded for the life of the process


def file_name(runtime: SharedRuntime) -> str:
    return Path(runtime.file).name


def store_key(runtime: SharedRuntime) -> str:
    """The runtime's key in a store, relative to the store's root."""
    return "/".join([*STORE_DIR, runtime.key, file_name(runtime)])


def store_copy(base: Path, runtime: SharedRuntime) -> Path:
    """Where a store rooted at `base` (or the servable cache's copy of it) keeps the runtime."""
    return base.joinpath(*STORE_DIR, runtime.key, file_name(runtime))


def install_dir() -> Path:
    """Where `kiln compile` installs the runtimes it links: the cache directory's runtime/."""
    return cache_root() / "runtime"


def installed_dirs() -> list[Path]:
    configured = [Path(d) for d in os.environ.get(PATH_ENV, "").split(":") if d]
    return [*configured, install_dir()]


def install_copy(runtime: SharedRuntime) -> Path:
    return install_dir() / runtime.key / file_name(runtime)


def installed(runtime: SharedRuntime) -> Path | None:
    """The first installed copy of the runtime, unchecked, or None."""
    return next(
        (path for path in (d / runtime.key / file_name(runtime) for d in installed_dirs()) if path.is_file()), None
    )


def candidates(directory: Path, runtime: SharedRuntime) -> list[Path]:
    """Every place a servable at BASE/NAME/VERSION looks for its runtime, in order. An embedded
    runtime is the servable's own copy, checked with its files."""
    if runtime.embedded:
        return [directory / runtime.file]
    return [
        *(d / runtime.key / file_name(runtime) for d in installed_dirs()),
        store_copy(directory.parent.parent, runtime),
    ]


def locate(directory: Path, runtime: SharedRuntime) -> Path:
    """The first copy of the runtime found, checked against the manifest's size and sha256 (once
    per process per file); an embedded copy is checked with the servable's files, as they are."""
    places = candidates(directory, runtime)
    found = next((path for path in places if path.is_file()), None)
    if found is None:
        raise ServableError(
            f"servable {directory} needs the Kiln runtime library {runtime.key} ({file_name(runtime)}), "
            f"which is neither installed here nor in its store; looked in: {', '.join(map(str, places))}. "
            f"Copy BASE/{'/'.join(STORE_DIR)}/{runtime.key}/ from where it was compiled to its store (beside the "
            f"model directories) or into a directory of {PATH_ENV}, or recompile it with --embed-runtime"
        )
    if runtime.embedded:
        return found
    size, sha256 = runtime.size, runtime.sha256
    status = found.stat()
    if status.st_size != size:
        raise ServableError(
            f"runtime library {found} has {status.st_size} bytes, servable {directory} "
            f"expects {size} (runtime {runtime.key})"
        )
    identity = (str(found), status.st_dev, status.st_ino, status.st_mtime_ns)
    with _lock:
        known = _verified.get(identity)
    if known is None:
        known = sha256_of(found)
        with _lock:
            _verified[identity] = known
    if known != sha256:
        raise ServableError(
            f"runtime library {found} has sha256 {known}, servable {directory} expects "
            f"{sha256} (runtime {runtime.key}): it is corrupt or another build; remove it"
        )
    return found


def load(directory: Path, runtime: SharedRuntime) -> Path:
    """Find, check and load the servable's runtime (once per key per process); returns its path."""
    from runtime.engines.xla_aot import check_elf, load_framework_library

    path = locate(directory, runtime)
    check_elf(path)  # dlopen of a truncated file would fault instead of raising
    load_framework_library()  # the runtime links TensorFlow's Abseil
    with _lock:
        if runtime.key not in _loaded:
            try:
                _loaded[runtime.key] = ctypes.CDLL(str(path))
            except OSError as e:
                raise ServableError(f"cannot load runtime library {path}: {e}") from None
    return path


def place(library: Path, target: Path) -> Path:
    """Put a copy of `library` at `target`, whole or not at all; an existing file of the same size is
    kept (equal keys mean interchangeable libraries; a corrupt one is refused when loaded)."""
    if target.is_file() and target.stat().st_size == library.stat().st_size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        shutil.copyfile(library, tmp)  # a copy, not a link: who damages one copy damages only that one
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
