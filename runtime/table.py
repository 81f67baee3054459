"""Plain-text tables for a person: a manifest as `kiln inspect` and `kiln compile` print it, and the
warmpool commands' tables."""

from __future__ import annotations

from collections.abc import Sequence

from runtime.cpu import architecture_of
from runtime.manifest import Manifest, TensorSpec, show_shape


def table(rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> str:
    """Rows (the first a header) in columns two spaces apart; the columns in `right` right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))
        ).rstrip()
        for row in rows
    )


def render(manifest: Manifest) -> str:
    total = sum(entry.size for entry in manifest.files.values())
    head = [
        ("model", f"{manifest.name} version {manifest.version}"),
        ("engine", manifest.engine),
        ("batch sizes", ", ".join(map(str, manifest.batch_sizes))),
        *(
            (
                f"target ({architecture_of(t.triple)})" if manifest.builds else "target",
                f"{t.triple} cpu={t.cpu}; features {' '.join(t.features) or '-'}",
            )
            for t in manifest.targets
        ),
        ("tensorflow", manifest.tensorflow_version),
        ("files", f"{len(manifest.files)} ({total / 1e6:.1f} MB)"),
        ("format", str(manifest.format_version)),
    ]
    if manifest.runtime is not None:
        where = (
            manifest.runtime.file
            if manifest.runtime.embedded
            else "not in the servable: installed or in its store's .kiln/runtime/, "
            f"{manifest.runtime.size / 1e6:.1f} MB"
        )
        head += [
            ("shared code", f"{manifest.runtime.key} ({where})"),
            (
                "bytes saved",
                f"{manifest.runtime.bytes_saved / 1e6:.1f} MB (against format 1: runtime and "
                f"weights in every bucket library)",
            ),
        ]
    width = max(len(key) for key, _ in head)
    lines = [f"{key:<{width}}  {value}" for key, value in head]
    rows = [("signature", "method", "engine", "inputs", "outputs")]
    for key, sig in manifest.signatures.items():
        rows.append(
            (
                key,
                sig.method.rsplit("/", 1)[-1],
                sig.engine + (" (jit)" if sig.jit else ""),
                _specs(sig.inputs),
                _specs(sig.outputs),
            )
        )
    lines += ["", table(rows)]
    for key, sig in manifest.signatures.items():
        if sig.reason:
            lines.append(f"  {key}: not ahead-of-time compiled: {sig.reason}")
        if sig.elementwise:
            lines.append(
                f"  {key}: elementwise: takes inputs of any shape they allow, run as flat runs of "
                f"elements (buckets count elements)"
            )
        if sig.host:
            steps = ", ".join(step.op for step in sig.host.steps)
            lines.append(f"  {key}: string front on the host ({steps}), then compiled code")
        if sig.state:
            pairs = ", ".join(
                f"{name} <- {output}{' (appended at the position)' if name in sig.appended else ''}"
                for name, output in sig.state.items()
            )
            held = f"; {sig.position.input} counts tokens, at most {sig.position.capacity}" if sig.position else ""
            lines.append(f"  {key}: state {pairs}{held}")
    return "\n".join(lines)


def _specs(specs: tuple[TensorSpec, ...]) -> str:
    return ", ".join(f"{s.name}:{s.dtype}{show_shape(s.shape)}" for s in specs)
