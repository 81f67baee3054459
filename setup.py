"""The build step pyproject.toml cannot say: generate the protobuf modules (runtime/protos/build.py)
while building, so a wheel, an sdist and `pip install .`/`-e .` carry them, not only `make setup`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent
PROTOS = Path("runtime") / "protos"


def _generate(package_root: Path) -> None:
    """Run the project's generator on package_root/runtime/protos, loaded by path: importing the
    runtime package here would need its dependencies, which the build environment lacks."""
    spec = importlib.util.spec_from_file_location("_kiln_protos_build", HERE / PROTOS / "build.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    generator.build(root=HERE / PROTOS, out=package_root / PROTOS / "generated")


class BuildPy(build_py):
    """Generate into the wheel's tree; an editable install imports from the sources, so there."""

    def run(self) -> None:
        super().run()
        _generate(HERE if self.editable_mode else Path(self.build_lib))


class Sdist(sdist):
    """The sdist carries the generated modules too (and the .proto files, MANIFEST.in)."""

    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        _generate(Path(base_dir))


setup(cmdclass={"build_py": BuildPy, "sdist": Sdist})
