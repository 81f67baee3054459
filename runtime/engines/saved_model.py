"""The fallback engine: full TensorFlow, for signatures XLA AOT cannot take.

Signatures that XLA can compile run under jit_compile, reading the persistent compilation cache
the compiler prebuilt for every bucket (xla_cache/), so no request pays a compile. Others (string
inputs, lookup tables) run as TensorFlow graphs. TensorFlow is imported only when such a servable
is loaded.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
from pathlib import Path

import numpy as np

from runtime.errors import InvalidInput, ServableError
from runtime.manifest import Signature

SAVED_MODEL_DIR = "saved_model"
XLA_CACHE_DIR = "xla_cache"
log = logging.getLogger(__name__)
_import_lock = threading.Lock()
_configured_cache: Path | None = None  # the XLA cache TensorFlow was started with, if Kiln started it


def import_tensorflow(cache: Path, writable: bool = False):
    """Import TensorFlow with the persistent XLA cache pointed at `cache` (read-only when serving).

    The flags are read when TensorFlow starts, so they only take effect in a process that has not
    imported it yet; otherwise compilations fall back to TensorFlow's in-memory cache.
    """
    global _configured_cache
    with _import_lock:
        if "tensorflow" not in sys.modules:
            # Ours replace any cache flags inherited from a parent process that served another one.
            kept = [
                f for f in os.environ.get("TF_XLA_FLAGS", "").split() if not f.startswith("--tf_xla_persistent_cache_")
            ]
            os.environ["TF_XLA_FLAGS"] = " ".join(
                [
                    *kept,
                    f"--tf_xla_persistent_cache_directory={cache}",
                    f"--tf_xla_persistent_cache_read_only={'false' if writable else 'true'}",
                ]
            )
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
            _configured_cache = cache
            return _import_without_keras()
        if _configured_cache != cache:
            log.warning(
                "tensorflow started before this servable loaded: its prebuilt XLA cache at %s "
                "is not used, so first calls compile",
                cache,
            )
        import tensorflow as tf

        return tf


def _import_without_keras():
    """`import tensorflow` without the eager import of all of Keras it makes at start (for
    SavedModels holding optimizers; with scikit-learn and IPython it is about two thirds of
    TensorFlow's import time, load/string_models.py), which serving a signature does not need.
    Keras stays importable: anything that needs it later imports it then."""
    blocked = "keras" not in sys.modules
    if blocked:
        sys.modules["keras"] = None  # TensorFlow's `import keras.src.optimizers` fails, which it tolerates
    try:
        import tensorflow as tf
    finally:
        if blocked and sys.modules.get("keras", False) is None:
            del sys.modules["keras"]
    return tf


@functools.cache
def load_saved_model(path: Path):
    """One load per SavedModel directory, shared by all of its signatures."""
    import tensorflow as tf

    try:
        return tf.saved_model.load(str(path))
    except Exception as e:  # TensorFlow raises assorted errors for broken SavedModels
        raise ServableError(f"cannot load the SavedModel at {path}: {e}") from None


class SavedModelRunner:
    def __init__(self, directory: Path, key: str, signature: Signature, writable_cache: bool | None = None):
        if writable_cache is None:  # operators may let serving add shapes the build did not prebuild
            writable_cache = os.environ.get("KILN_XLA_CACHE_WRITABLE", "") == "1"
        self.tf = import_tensorflow(directory / XLA_CACHE_DIR, writable_cache)
        self.signature = signature
        loaded = load_saved_model(directory / SAVED_MODEL_DIR)
        try:
            function = loaded.signatures[key]
        except KeyError:
            raise ServableError(f"the packaged SavedModel has no signature '{key}'") from None
        self.function = self.tf.function(lambda **kw: function(**kw), jit_compile=True) if signature.jit else function

    def run(self, inputs: dict[str, np.ndarray], bucket: int) -> dict[str, np.ndarray]:
        rows = next(iter(inputs.values())).shape[0] if self.signature.batched else None
        feed = {}
        for name, array in inputs.items():
            if rows is not None and rows < bucket:
                pad = np.zeros((bucket - rows, *array.shape[1:]), dtype=array.dtype)
                if array.dtype == object:
                    pad[...] = b""
                array = np.concatenate([array, pad])
            feed[name] = self.tf.constant(array, dtype=self.tf.string if array.dtype == object else None)
        try:
            outputs = self.function(**feed)
        except (self.tf.errors.InvalidArgumentError, ValueError, TypeError) as e:
            raise InvalidInput(f"the model rejected the input: {_first_line(e)}") from None
        if rows is None:  # unbatched: the whole output, a scalar (rank 0) too
            return {name: np.asarray(value.numpy()) for name, value in outputs.items()}
        return {name: value.numpy()[:rows] for name, value in outputs.items()}

    def close(self) -> None:
        self.function = None


def _first_line(error: Exception) -> str:
    text = getattr(error, "message", None) or str(error)
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__
