"""Each weight once: every bucket's constants, deduplicated into one weights library per servable.

tfcompile writes a bucket's constants into P_constants.o, one symbol per constant
(`__tfcompile_CLASS_Constant_N_constant_buffer_contents`), each a 64-byte header whose first 8 bytes are
the data's size, then the data, padded to a power of two. Only the generated header's
EmbeddedConstantBuffers() refers to these symbols (the generated code takes constants from the buffer
table), and it reads the size from the header. So the constants of every bucket and signature are
repacked here: each distinct (size, data) is stored once, header and data, 64-byte aligned and without
padding, in one shared library whose symbols name every bucket's constants, several symbols at one
address where buckets share a weight. The bucket libraries link it (rpath $ORIGIN); it is mapped
read-only, so processes on one host share its pages. Its soname holds a hash of its contents, so a
process loads one copy of identical weights and never confuses two servables' weights.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

from runtime.errors import CompileError

HEADER = 64  # bytes before each constant's data; its first 8 are the data's size (tfcompile's layout)
ALIGN = 64  # the most any vector load of the generated code needs
CONSTANT_SUFFIX = "_constant_buffer_contents"
CONSTANTS = "_constants.o"  # how tfcompile's constants object's name ends


def read_constants(obj: Path) -> Iterator[tuple[str, bytes]]:
    """(symbol, data) for every constant a tfcompile constants object defines."""
    raw = obj.read_bytes()
    if raw[:4] != b"\x7fELF" or raw[4] != 2 or raw[5] != 1:
        raise CompileError(f"{obj.name} is not a 64-bit little-endian ELF object")
    (shoff,) = struct.unpack_from("<Q", raw, 40)
    shentsize, shnum = struct.unpack_from("<HH", raw, 58)
    sections = [struct.unpack_from("<IIQQQQIIQQ", raw, shoff + i * shentsize) for i in range(shnum)]
    for _, kind, _, _, offset, size, link, _, _, entsize in sections:
        if kind != 2:  # SHT_SYMTAB
            continue
        names = sections[link]
        for at in range(offset, offset + size, entsize):
            name_at, _, _, index, value, length = struct.unpack_from("<IBBHQQ", raw, at)
            name = raw[names[4] + name_at : raw.index(b"\0", names[4] + name_at)].decode()
            if not name.endswith(CONSTANT_SUFFIX) or not 0 < index < len(sections):
                continue
            start = sections[index][4] + value
            (data_size,) = struct.unpack_from("<Q", raw, start)
            if HEADER + data_size > length:
                raise CompileError(f"{obj.name}: constant {name} says {data_size} bytes in a {length}-byte symbol")
            yield name, raw[start + HEADER : start + HEADER + data_size]


def pack(constants: Sequence[tuple[str, bytes]]) -> tuple[bytes, dict[str, int]]:
    """One blob holding each distinct constant once (header + data, aligned), and each symbol's offset."""
    blob = bytearray()
    placed: dict[bytes, int] = {}
    offsets = {}
    for name, data in constants:
        digest = hashlib.sha256(data).digest() + struct.pack("<Q", len(data))
        if digest not in placed:
            placed[digest] = len(blob)
            blob += struct.pack("<Q", len(data)).ljust(HEADER, b"\0") + data
            blob += b"\0" * (-len(blob) % ALIGN)
        offsets[name] = placed[digest]
    return bytes(blob), offsets


def assembly(blob_path: Path, offsets: dict[str, int]) -> str:
    """Assembler source that defines every symbol at its offset in the included blob."""
    lines = ['.section .rodata,"a"', f".balign {ALIGN}", "kiln_weights_blob:", f'.incbin "{blob_path}"']
    for name, offset in sorted(offsets.items()):
        lines += [f".globl {name}", f".type {name}, @object", f".set {name}, kiln_weights_blob + {offset}"]
    lines.append('.section .note.GNU-stack,"",@progbits')
    return "\n".join(lines) + "\n"


def weights_name(blob: bytes, offsets: dict[str, int]) -> str:
    digest = hashlib.sha256(blob)
    digest.update(repr(sorted(offsets.items())).encode())
    return f"libkiln_weights-{digest.hexdigest()[:16]}.so"


def link_weights(constants_objects: Sequence[Path], out_dir: Path, work: Path, cxx: str = "g++") -> Path:
    """The weights library of every bucket's constants objects, written to `out_dir`."""
    from runtime.compiler.toolchain import run

    blob, offsets = pack([constant for obj in constants_objects for constant in read_constants(obj)])
    name = weights_name(blob, offsets)
    work.mkdir(parents=True, exist_ok=True)
    (work / "weights.bin").write_bytes(blob)
    (work / "weights.S").write_text(assembly(work / "weights.bin", offsets))
    run([cxx, "-c", str(work / "weights.S"), "-o", str(work / "weights.o")], "assembling the weights")
    out_dir.mkdir(parents=True, exist_ok=True)
    run(
        [cxx, "-shared", "-o", str(out_dir / name), str(work / "weights.o"), f"-Wl,-soname,{name}", "-s"],
        f"linking {name}",
    )
    return out_dir / name
