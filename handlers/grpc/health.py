"""The standard gRPC health service (grpc.health.v1.Health, grpcio-health-checking), which Kubernetes'
and Knative's gRPC probes and load balancers ask.

The server's status (service "") follows `App.ready()`, each model's (service = the model's name)
`repository.is_available(name)`: SERVING or NOT_SERVING; a model no longer configured is
SERVICE_UNKNOWN, one never configured NOT_FOUND (Check) as the protocol says. The library's servicer
answers Check and Watch; a task on the server's event loop copies readiness into it, so a Watch
hears a change within POLL_SECONDS. At shutdown everything turns NOT_SERVING first.
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from runtime.app import App

POLL_SECONDS = 0.5  # readiness changes on loads and unloads, which take far longer
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
OPEN_METHODS = frozenset({f"/{health.SERVICE_NAME}/Check", f"/{health.SERVICE_NAME}/Watch"})


class Health:
    """The health servicer and the task that keeps it current; `stop()` before the server stops."""

    def __init__(self, app: App):
        self.app = app
        self.servicer = health.aio.HealthServicer()
        self._task: asyncio.Task | None = None

    def add_to(self, server: grpc.aio.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    async def start(self) -> None:
        await self.update()
        self._task = asyncio.get_running_loop().create_task(self._follow())

    async def update(self, known: set[str] | None = None) -> set[str]:
        """Copy readiness into the servicer; returns the models listed now (`known`: those before)."""
        names = set(self.app.repository.names())
        await self.servicer.set(health.OVERALL_HEALTH, SERVING if self.app.ready() else NOT_SERVING)
        for name in names:
            await self.servicer.set(name, SERVING if self.app.repository.is_available(name) else NOT_SERVING)
        for name in (known or set()) - names:
            await self.servicer.set(name, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
        return names

    async def _follow(self) -> None:
        known: set[str] = set()
        while True:
            known = await self.update(known)
            await asyncio.sleep(POLL_SECONDS)

    async def stop(self) -> None:
        """NOT_SERVING for all, so that balancers drain this server while its calls finish."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.servicer.enter_graceful_shutdown()
