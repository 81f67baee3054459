"""What the batch engine integration tests share: rows of the digits example with bad rows among
them, and every good row's outputs from the engine called directly."""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

ROWS = 2000
WRONG_SHAPE, NULL = 5, 7  # the bad rows: ten values instead of 784, and no value at all


@dataclass(frozen=True)
class DigitRows:
    servable: Path
    images: np.ndarray  # (ROWS, 28, 28, 1) float32, bad rows' places included
    expected: np.ndarray  # the engine's probabilities for every row (bad rows' are meaningless)

    @property
    def good(self) -> list[int]:
        return [row for row in range(len(self.images)) if row not in (WRONG_SHAPE, NULL)]

    def values(self) -> list:
        """One value per row, the bad ones in their places."""
        rows: list = list(self.images)
        rows[WRONG_SHAPE], rows[NULL] = np.zeros(10, np.float32), None
        return rows

    def flat_values(self) -> list:
        """The same as a table's list column holds them (Parquet, Spark): 784 values a row."""
        return [None if value is None else value.ravel() for value in self.values()]


def digit_rows(tmp_path_factory) -> DigitRows:
    from examples.build import build_examples
    from examples.digits import load_images
    from runtime.engines.base import Engine

    servable = build_examples(tmp_path_factory.mktemp("servables"), ["digits"], log=lambda _: None)["digits"].servable
    images = np.resize(load_images()[0], (ROWS, 28, 28, 1))
    engine = Engine.open(servable)
    try:
        expected = np.concatenate([engine.run("serving_default", {"images": images[i:i + 32]})["probabilities"]
                                   for i in range(0, ROWS, 32)])
    finally:
        engine.close()
    return DigitRows(servable, images, expected)


def check_scored(rows: DigitRows, probabilities: np.ndarray, errors: list) -> None:
    """Every good row's outputs as the engine gives them, and each bad row's error as documented."""
    assert len(probabilities) == len(errors) == ROWS
    assert "must have shape [-1, 28, 28, 1], got [1, 10]" in errors[WRONG_SHAPE]
    assert "has no value (null or missing)" in errors[NULL]
    assert np.isnan(probabilities[WRONG_SHAPE]).all() and np.isnan(probabilities[NULL]).all()
    good = rows.good
    assert [errors[row] for row in good] == [None] * len(good)
    np.testing.assert_allclose(probabilities[good], rows.expected[good], rtol=1e-5, atol=1e-6)


def engine_module(name: str) -> ModuleType:
    """The engine's package; a skip where it is not installed, except in CI (make setup installs it)."""
    if os.environ.get("CI"):
        return importlib.import_module(name)
    return pytest.importorskip(name, reason=f"{name} is not installed (make setup installs it)")
