"""A manifest as the tables `kiln inspect` and `kiln compile` print for a person."""

from __future__ import annotations

from runtime.cpu import architecture_of
from runtime.manifest import Manifest, TensorSpec, show_shape


def render(manifest: Manifest) -> str:
    total = sum(entry.size for entry in manifest.files.values())
    head = [
        ("model", f"{manifest.name} version {manifest.version}"),
        ("engine", manifest.engine),
        ("batch sizes", ", ".join(map(str, manifest.batch_sizes))),
        *((f"target ({architecture_of(t.triple)})" if manifest.builds else "target", f"{t.triple} cpu={t.cpu}; "
           f"features {' '.join(t.features) or '-'}") for t in manifest.targets),
        ("tensorflow", manifest.tensorflow_version),
        ("files", f"{len(manifest.files)} ({total / 1e6:.1f} MB)"),
        ("format", str(manifest.format_version)),
    ]
    if manifest.runtime is not None:
        head += [("shared code", f"{manifest.runtime.key} ({manifest.runtime.file})"),
                 ("bytes saved", f"{manifest.runtime.bytes_saved / 1e6:.1f} MB (against format 1: runtime and "
                                 f"weights in every bucket library)")]
    width = max(len(key) for key, _ in head)
    lines = [f"{key:<{width}}  {value}" for key, value in head]
    rows = [("signature", "method", "engine", "inputs", "outputs")]
    for key, sig in manifest.signatures.items():
        rows.append((key, sig.method.rsplit("/", 1)[-1], sig.engine + (" (jit)" if sig.jit else ""),
                     _specs(sig.inputs), _specs(sig.outputs)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines.append("")
    for row in rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    for key, sig in manifest.signatures.items():
        if sig.reason:
            lines.append(f"  {key}: not ahead-of-time compiled: {sig.reason}")
        if sig.elementwise:
            lines.append(f"  {key}: elementwise: takes inputs of any shape they allow, run as flat runs of "
                         f"elements (buckets count elements)")
        if sig.state:
            pairs = ", ".join(f"{name} <- {output}{' (appended at the position)' if name in sig.appended else ''}"
                              for name, output in sig.state.items())
            held = f"; {sig.position.input} counts tokens, at most {sig.position.capacity}" if sig.position else ""
            lines.append(f"  {key}: state {pairs}{held}")
    return "\n".join(lines)


def _specs(specs: tuple[TensorSpec, ...]) -> str:
    return ", ".join(f"{s.name}:{s.dtype}{show_shape(s.shape)}" for s in specs)
