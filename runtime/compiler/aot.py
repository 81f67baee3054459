"""XLA ahead-of-time compilation of one static-shape signature into object files (tfcompile)."""

from __future__ import annotations

from pathlib import Path

from runtime.errors import CompileError
from runtime.manifest import Target


def tfcompile(
    static_model: Path, meta_graph, key: str, prefix: Path, cpp_class: str, target: Target, multithreading: bool
) -> tuple[Path, list[Path]]:
    """Compile signature `key` of the static SavedModel; returns the header and the objects to link.

    The metadata object (a serialized compilation result) is left out: the generated class does
    not reference it, and it only adds size.
    """
    from tensorflow.python.tools import saved_model_aot_compile

    try:
        saved_model_aot_compile.aot_compile_cpu_meta_graph_def(
            checkpoint_path=str(static_model / "variables" / "variables"),
            meta_graph_def=meta_graph,
            output_prefix=str(prefix),
            signature_def_key=key,
            cpp_class=cpp_class,
            target_triple=target.triple,
            target_cpu=target.cpu,
            variables_to_feed=(),
            multithreading=multithreading,
        )
    except Exception as e:  # tfcompile reports unsupported ops and the like as assorted errors
        message = str(e).strip().splitlines()
        raise CompileError(message[0] if message else type(e).__name__) from None
    return prefix.with_suffix(".h"), [prefix.with_suffix(".o"), Path(f"{prefix}_constants.o")]
