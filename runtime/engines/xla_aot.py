"""The thin engine: runs XLA ahead-of-time compiled libraries through ctypes, without TensorFlow.

Each (signature, bucket) is one shared library exporting the kiln_* C functions of
runtime/compiler/shim.cc. An instance of the compiled class owns its argument, result and temp
buffers, so instances are pooled: a thread takes one, fills its arguments through numpy views,
runs it with the GIL released (ctypes releases it), copies the results out and gives it back.

An input with the argument's exact layout (the bucket's full shape and dtype, C-contiguous), whose
data starts on an ALIGNMENT boundary (the compiled code assumes aligned buffers; runtime.aligned
allocates such arrays) and that has at least BY_POINTER_MIN_BYTES is lent instead of copied: the
instance's argument points at the caller's data for that one run (the generated code never writes
its arguments), then back at its own buffer. So a decode loop's cache pool, tens of MiB fed in
every step, costs nothing to pass. Until run() returns, the caller must not write the rows of a lent
array whose results it will use (rows are independent, as batching everywhere assumes). Libraries
compiled before lending existed lack kiln_set_arg_data; they still load, and copy every input.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import struct
import sys
import threading
from pathlib import Path

import numpy as np

from runtime.aligned import ALIGNMENT
from runtime.cpu import host_architecture
from runtime.errors import ServableError
from runtime.manifest import Signature, TensorSpec

FRAMEWORK_LIBRARY = "libtensorflow_framework.so.2"
# Lending takes about 5 us of ctypes calls, about what copying 256-512 KiB takes; smaller
# inputs are cheaper to copy.
BY_POINTER_MIN_BYTES = 256 * 1024
P = ctypes.c_void_p
PROTOTYPES = {
    "kiln_new": (P, []),
    "kiln_delete": (None, [P]),
    "kiln_num_args": (ctypes.c_int, [P]),
    "kiln_num_results": (ctypes.c_int, [P]),
    "kiln_arg_index": (ctypes.c_int, [P, ctypes.c_char_p]),
    "kiln_result_index": (ctypes.c_int, [P, ctypes.c_char_p]),
    "kiln_arg_size": (ctypes.c_long, [P, ctypes.c_int]),
    "kiln_result_size": (ctypes.c_long, [P, ctypes.c_int]),
    "kiln_arg_data": (P, [P, ctypes.c_int]),
    "kiln_result_data": (P, [P, ctypes.c_int]),
    "kiln_run": (ctypes.c_char_p, [P]),
    "kiln_thread_pool_new": (P, [ctypes.c_int]),
    "kiln_thread_pool_delete": (None, [P]),
    "kiln_set_thread_pool": (None, [P, P]),
}
# Not in libraries an older Kiln compiled, which still load: their inputs are always copied.
OPTIONAL_PROTOTYPES = {"kiln_set_arg_data": (None, [P, ctypes.c_int, P])}


_framework_lock = threading.Lock()


@functools.cache
def _framework_library() -> ctypes.CDLL:
    """The Abseil the compiled code links against ships in TensorFlow's framework library.

    It is loaded by path (KILN_TF_FRAMEWORK_LIBRARY, else found beside an installed tensorflow
    package, which is located but never imported) with RTLD_GLOBAL, so the bucket libraries, which
    name it as a dependency, resolve to it.
    """
    path = os.environ.get("KILN_TF_FRAMEWORK_LIBRARY")
    if not path:
        spec = importlib.util.find_spec("tensorflow")
        locations = list(spec.submodule_search_locations or []) if spec else []
        path = next((str(Path(d) / FRAMEWORK_LIBRARY) for d in locations if (Path(d) / FRAMEWORK_LIBRARY).exists()), "")
    if not path:
        raise ServableError(
            f"xla-aot servables need {FRAMEWORK_LIBRARY}: install tensorflow-cpu or set "
            f"KILN_TF_FRAMEWORK_LIBRARY to the file's path"
        )
    if "tensorflow" not in sys.modules:  # else TensorFlow has read it already
        # Its static start-up announces oneDNN on stderr unless oneDNN is off; nothing here uses it.
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    try:
        return ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        raise ServableError(f"cannot load {path}: {e}") from None


def load_framework_library() -> ctypes.CDLL:
    with _framework_lock:  # one load, even when the background preload is still running
        return _framework_library()


def preload_framework_library() -> None:
    """Start loading the framework library in the background (dlopen does not hold the GIL);
    load_framework_library() then waits for it."""
    threading.Thread(target=_load_quietly, daemon=True).start()


def _load_quietly() -> None:
    try:
        load_framework_library()
    except ServableError:
        pass  # reported again, in the caller's thread, by the load that needs it


def default_threads() -> int:
    configured = os.environ.get("KILN_INTRA_OP_THREADS")
    return int(configured) if configured else len(os.sched_getaffinity(0))


ELF_MACHINES = {"x86_64": 62, "aarch64": 183}
PT_LOAD = 1


def check_elf(path: Path) -> None:
    """Refuse a library that is not a complete ELF shared object for this machine.

    dlopen maps segments as the headers describe them; a truncated file would fault with SIGBUS
    inside the loader, killing the process instead of raising.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(64)
            size = os.fstat(f.fileno()).st_size
            if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
                raise ServableError(f"{path.name} is not a 64-bit little-endian ELF library")
            (machine,) = struct.unpack_from("<H", data, 18)
            if machine != ELF_MACHINES.get(host_architecture()):
                raise ServableError(f"{path.name} is for another machine (ELF machine {machine})")
            phoff, shoff = struct.unpack_from("<QQ", data, 32)
            phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", data, 54)
            if phoff + phnum * phentsize > size or shoff + shnum * shentsize > size:
                raise ServableError(f"{path.name} is truncated: its headers lie past its {size} bytes")
            f.seek(phoff)
            headers = f.read(phnum * phentsize)
    except OSError as e:
        raise ServableError(f"cannot read compiled library {path.name}: {e.strerror}") from None
    for i in range(phnum):
        kind, _, offset, _, _, filesz = struct.unpack_from("<IIQQQQ", headers, i * phentsize)
        if kind == PT_LOAD and offset + filesz > size:
            raise ServableError(
                f"{path.name} is truncated: a segment ends at byte {offset + filesz} of a {size}-byte file"
            )


class BucketLibrary:
    """One compiled library: its C functions, its pool of instances, the argument layout."""

    def __init__(self, path: Path, signature: Signature, bucket: int):
        check_elf(path)
        try:
            # Its own dependencies first: the dynamic linker otherwise binds the kernels it calls
            # (matmul, Kiln's convolution) to TensorFlow's copies wherever TensorFlow was imported
            # first, which put XLA's Eigen convolution, 13x slower on MobileNetV2, in Kiln's place.
            self.lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_LOCAL | os.RTLD_DEEPBIND)
        except OSError as e:
            raise ServableError(f"cannot load compiled library {path.name}: {e}") from None
        for name, (restype, argtypes) in PROTOTYPES.items():
            try:
                function = getattr(self.lib, name)
            except AttributeError:
                raise ServableError(f"{path.name} is not a Kiln library: it lacks {name}") from None
            function.restype, function.argtypes = restype, argtypes
        for name, (restype, argtypes) in OPTIONAL_PROTOTYPES.items():
            if hasattr(self.lib, name):
                getattr(self.lib, name).restype, getattr(self.lib, name).argtypes = restype, argtypes
        self.lends = hasattr(self.lib, "kiln_set_arg_data")
        self.name = path.name
        self.signature = signature
        self.bucket = bucket
        self.thread_pool: int | None = None
        self._idle: list[Instance] = []
        self._lock = threading.Lock()
        self._all: list[Instance] = []

    def acquire(self) -> Instance:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        instance = Instance(self)
        with self._lock:
            self._all.append(instance)
        return instance

    def release(self, instance: Instance) -> None:
        with self._lock:
            self._idle.append(instance)

    def close(self) -> None:
        with self._lock:
            for instance in self._all:
                instance.delete()
            self._all, self._idle = [], []


class Instance:
    """One compiled-function object and numpy views on its argument and result buffers.

    An argument lent a caller's array (lend) shows in no view until restore() points it back at
    the instance's own buffer, whose index and address are kept for that.
    """

    def __init__(self, library: BucketLibrary):
        lib = library.lib
        self.lib = lib
        self.handle = lib.kiln_new()
        if not self.handle:
            raise ServableError(f"{library.name}: the compiled function could not be created")
        lib.kiln_set_thread_pool(self.handle, library.thread_pool)
        signature, bucket = library.signature, library.bucket
        self.args = {
            spec.name: self._view(library, spec, bucket, lib.kiln_arg_index, lib.kiln_arg_size, lib.kiln_arg_data)
            for spec in signature.inputs
        }
        self.results = {
            spec.name: self._view(
                library, spec, bucket, lib.kiln_result_index, lib.kiln_result_size, lib.kiln_result_data
            )
            for spec in signature.outputs
        }
        self._own = {
            name: (lib.kiln_arg_index(self.handle, name.encode()), view.ctypes.data) for name, view in self.args.items()
        }  # name: (index, own buffer address)
        self._lent: list[str] = []

    def _view(self, library, spec: TensorSpec, bucket, index_of, size_of, data_of) -> np.ndarray:
        index = index_of(self.handle, spec.name.encode())
        # An elementwise signature's buffers are runs of `bucket` elements, whatever their declared rank.
        shape = library.signature.buffer_shape(spec, bucket)
        dtype = np.dtype(spec.dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if index < 0 or size_of(self.handle, index) != nbytes:
            raise ServableError(
                f"{library.name} does not match the manifest: tensor '{spec.name}' "
                f"of shape {list(shape)} {spec.dtype} is not in the compiled code"
            )
        buffer = memoryview((ctypes.c_char * nbytes).from_address(data_of(self.handle, index)))
        return np.frombuffer(buffer, dtype=dtype).reshape(shape)

    def lend(self, name: str, array: np.ndarray) -> None:
        """Point argument `name` at `array`'s data until restore(); the caller keeps `array` alive
        and unwritten meanwhile."""
        self.lib.kiln_set_arg_data(self.handle, self._own[name][0], array.ctypes.data)
        self._lent.append(name)

    def restore(self) -> None:
        """Point every lent argument back at the instance's own buffer."""
        for name in self._lent:
            self.lib.kiln_set_arg_data(self.handle, *self._own[name])
        self._lent.clear()

    def run(self) -> None:
        error = self.lib.kiln_run(self.handle)
        if error is not None:
            raise ServableError(f"the compiled model failed: {error.decode(errors='replace')}")

    def delete(self) -> None:
        self.lib.kiln_delete(self.handle)
        self.handle = None


class AotRunner:
    """Runs one signature: one library per bucket, one Eigen thread pool shared by all of them."""

    def __init__(self, directory: Path, signature: Signature, threads: int | None = None):
        load_framework_library()
        self.signature = signature
        self.threads = default_threads() if threads is None else threads
        self.libraries: dict[int, BucketLibrary] = {}
        self._pool = None
        try:
            for bucket, relative in sorted(signature.libraries.items()):
                self.libraries[bucket] = BucketLibrary(directory / relative, signature, bucket)
            self._pool_owner = next(iter(self.libraries.values())).lib
            if self.threads > 1:
                self._pool = self._pool_owner.kiln_thread_pool_new(self.threads)
            for library in self.libraries.values():
                library.thread_pool = self._pool
                library.release(library.acquire())  # the first instance checks the layout
        except BaseException:
            self.close()
            raise

    def run(self, inputs: dict[str, np.ndarray], bucket: int) -> dict[str, np.ndarray]:
        library = self.libraries[bucket]
        instance = library.acquire()
        try:
            for name, view in instance.args.items():
                array = inputs[name]
                if library.lends and _lendable(array, view):
                    instance.lend(name, array)
                    continue
                rows = array.shape[0] if self.signature.batched else view.shape[0]
                view[:rows] = array
                if rows < view.shape[0]:
                    view[rows:] = 0
            instance.run()
            if not self.signature.batched:
                return {name: view.copy() for name, view in instance.results.items()}
            rows = next(iter(inputs.values())).shape[0]
            return {name: view[:rows].copy() for name, view in instance.results.items()}
        finally:
            instance.restore()
            library.release(instance)

    def close(self) -> None:
        for library in self.libraries.values():
            library.close()
        self.libraries = {}
        if self._pool is not None:
            self._pool_owner.kiln_thread_pool_delete(self._pool)
            self._pool = None


def _lendable(array: np.ndarray, view: np.ndarray) -> bool:
    """Whether `array` can be passed by pointer in place of the argument `view` (see the module
    docstring): it is the argument's exact layout, aligned, and big enough to be worth it."""
    return (
        array.nbytes >= BY_POINTER_MIN_BYTES
        and array.shape == view.shape
        and array.dtype == view.dtype
        and array.flags.c_contiguous
        and array.ctypes.data % ALIGNMENT == 0
    )
