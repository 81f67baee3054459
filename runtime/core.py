"""The core as the modules it calls see it: what they call back, as a typing.Protocol that
runtime.app's App satisfies. Predicting and generating in a session (runtime.sessions) and the REST
endpoints (runtime.endpoints) take a `Core`, so none of them imports the app, which imports them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import numpy as np

    from runtime.exchange import Exchange
    from runtime.metrics import Metrics
    from runtime.repository import Repository, ServableHandle
    from runtime.runner import Runner
    from runtime.sessions.services import Sessions


class Core(Protocol):
    repository: Repository
    metrics: Metrics
    runner: Runner  # its observe counts the decode loop's steps

    @property
    def sessions(self) -> Sessions:
        """The session services (made on first use)."""
        ...

    async def execute(
        self, handle: ServableHandle, key: str, inputs: dict[str, np.ndarray], exchange: Exchange
    ) -> dict[str, np.ndarray]:
        """A signature's outputs for a request's decoded inputs (the prediction cache, the runner)."""
        ...

    async def run_examples(
        self, handle: ServableHandle, key: str, method: str, serialized: np.ndarray, exchange: Exchange
    ) -> dict[str, np.ndarray]:
        """A classify or regress signature's outputs for serialized tf.Examples."""
        ...

    def ready(self) -> bool:
        """Whether every configured model can take requests."""
        ...
