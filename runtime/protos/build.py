"""Build step: generate Python modules (and gRPC stubs) from every .proto under runtime/protos.

Run as `python -m runtime.protos.build` (`make setup` does). protoc writes imports that mirror the
.proto paths (`from tensorflow_serving.config import ..._pb2`); they are rewritten to point into
runtime.protos.generated, so the generated tree never shadows the real tensorflow_serving package
that test clients import. The .proto file names themselves stay TensorFlow Serving's, so both sets
of modules register the same descriptors and can live in one process.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "generated"
PACKAGE = "runtime.protos.generated"
GENERATOR_STAMP = ".generator"
_IMPORT = re.compile(r"^(from|import) ([\w.]+)( import (\w+|\*))?( as \w+)?$", re.MULTILINE)


def build(root: Path = ROOT, out: Path = OUT, package: str = PACKAGE) -> bool:
    """Generate `out` from the .proto files under `root` unless it is newer than all of them.

    Returns whether protoc ran. The new tree is written beside `out` and swapped in whole, so a
    failed build leaves the previous one, and modules of deleted .proto files do not linger.
    """
    protos = sorted(path.relative_to(root) for path in root.rglob("*.proto"))
    if _fresh(root, out, protos):
        return False
    if importlib.util.find_spec("grpc_tools") is None:
        raise SystemExit(
            "generating the protobuf modules needs grpcio-tools: "
            "pip install -e '.[dev]' (make setup) or pip install grpcio-tools"
        )
    with tempfile.TemporaryDirectory(prefix=".generated-", dir=out.parent) as tmp:
        staged = Path(tmp) / "out"
        staged.mkdir()
        descriptors = Path(tmp) / "descriptors.pb"
        # A child process: protoc's C++ protobuf must not meet another in this one (TensorFlow's).
        # grpc_tools.protoc as __main__ adds the include path of the well-known types.
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"-I{root}",
                f"--python_out={staged}",
                f"--grpc_python_out={staged}",
                f"--descriptor_set_out={descriptors}",
                *map(str, protos),
            ]
        )
        if done.returncode != 0:
            raise SystemExit(f"protoc failed on the .proto files under {root} (its messages are above)")
        _drop_empty_stubs(staged, descriptors.read_bytes())
        _rewrite_imports(staged, package, {_module(proto) for proto in protos})
        for directory in [staged, *(path for path in staged.rglob("*") if path.is_dir())]:
            (directory / "__init__.py").touch()
        (staged / GENERATOR_STAMP).write_text(_generator())
        old = Path(tmp) / "old"
        if out.exists():
            out.rename(old)
        staged.rename(out)
    return True


def _generator() -> str:
    """The generator's version: its output embeds (and at import checks) the protobuf runtime version."""
    from importlib.metadata import version

    return f"grpcio-tools {version('grpcio-tools')}"


def _fresh(root: Path, out: Path, protos: list[Path]) -> bool:
    """The outputs are exactly this set of .proto files' modules, made by this generator, all newer
    than every input."""
    outputs = list(out.rglob("*.py")) if out.is_dir() else []
    stamp = out / GENERATOR_STAMP
    if not outputs or not stamp.is_file() or stamp.read_text() != _generator():
        return False
    expected = {proto.with_name(proto.stem + "_pb2.py") for proto in protos}
    if {path.relative_to(out) for path in outputs if path.name.endswith("_pb2.py")} != expected:
        return False
    inputs = [root / proto for proto in protos] + [Path(__file__)]
    return min(path.stat().st_mtime for path in outputs) >= max(path.stat().st_mtime for path in inputs)


def _module(proto: Path) -> str:
    """The module protoc names for a .proto path: a/b/c.proto -> a.b.c_pb2."""
    return ".".join(proto.with_name(proto.stem + "_pb2").parts)


def _drop_empty_stubs(staged: Path, descriptor_set: bytes) -> None:
    """grpc_tools writes a *_pb2_grpc.py for every file; keep only those of files with services."""
    from google.protobuf import descriptor_pb2

    for file in descriptor_pb2.FileDescriptorSet.FromString(descriptor_set).file:
        if not file.service:
            proto = Path(file.name)
            stub = staged / proto.with_name(proto.stem + "_pb2_grpc.py")
            stub.unlink(missing_ok=True)


def _rewrite_imports(staged: Path, package: str, modules: set[str]) -> None:
    """Point imports of generated modules into `package` (`import *` too: protoc's form of a public
    import); leave google.protobuf and grpc alone."""

    def rewrite(match: re.Match) -> str:
        keyword, name, _, imported, alias = match.groups()
        if keyword == "from" and (f"{name}.{imported}" in modules or imported == "*" and name in modules):
            return f"from {package}.{name} import {imported}{alias or ''}"
        if keyword == "import" and name in modules:
            return f"from {package} import {name}{alias or ''}"
        return match.group(0)

    for path in staged.rglob("*.py"):
        path.write_text(_IMPORT.sub(rewrite, path.read_text()))


if __name__ == "__main__":
    print(f"{OUT}: {'generated' if build() else 'up to date'}")
