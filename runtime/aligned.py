"""Arrays whose data starts on an alignment boundary.

The xla-aot engine passes a large input to the compiled code by pointer, without copying it, only
when its data is aligned (see runtime/engines/xla_aot.py). numpy's allocator promises 16 bytes
(a large array from glibc usually starts 16 bytes past a page), so arrays meant to be fed to it
every step, such as a decode loop's cache pool, are allocated here.
"""

from __future__ import annotations

import numpy as np

# Bytes. The compiled code needs xla::cpu::MinAlign() (xla/backends/cpu/alignment.h), which is
# Eigen's EIGEN_MAX_ALIGN_BYTES for the target: 64 with AVX-512, 32 with AVX, 16 otherwise on x86
# and Arm. 64 covers them all and is XLA's own preferred alignment, xla::cpu::Align().
ALIGNMENT = 64


def aligned_zeros(shape, dtype, alignment: int = ALIGNMENT) -> np.ndarray:
    """A C-contiguous array of zeros whose data pointer is a multiple of `alignment` bytes.

    The buffer comes from np.zeros, which takes large sizes zeroed from the OS (calloc, mmap), so
    pages nobody touches cost no memory.
    """
    dtype = np.dtype(dtype)
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.zeros(nbytes + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start : start + nbytes].view(dtype).reshape(shape)
