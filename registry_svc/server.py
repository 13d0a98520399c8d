"""Registry gRPC server: RegistryService and JobService in one process.

This process owns the SQL metadata and the blob store; it never opens Qdrant (local mode
allows one process per path): embedding and vector writes are Celery tasks
(:mod:`registry_svc.worker`).
"""

from __future__ import annotations

import asyncio
import contextlib

from celery import Celery

from loraserve.api.v1 import jobs_pb2_grpc, registry_pb2_grpc
from loraserve.auth import TokenAuth
from loraserve.server import GrpcServer, ServiceRegistration
from registry_svc.context import RegistryContext
from registry_svc.job_servicer import JobServicer
from registry_svc.maintenance import maintenance_loop
from registry_svc.servicer import RegistryServicer
from registry_svc.settings import RegistrySettings


class RegistryServer(GrpcServer):
    """A GrpcServer that also runs the registry's maintenance loop while it serves."""

    def __init__(self, ctx: RegistryContext, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ctx = ctx
        self._maintenance: asyncio.Task | None = None
        self.on_stop.append(self._stop_maintenance)

    async def start(self) -> int:
        port = await super().start()
        self._maintenance = asyncio.create_task(maintenance_loop(self.ctx))
        return port

    async def _stop_maintenance(self) -> None:
        if self._maintenance is not None:
            self._maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintenance
            self._maintenance = None


def build_server(settings: RegistrySettings, *, celery: Celery | None = None) -> GrpcServer:
    """The registry server (not started). ``celery``: the app used to send tasks; default
    :func:`registry_svc.worker.make_celery` from the settings."""
    common = settings.common
    ctx = RegistryContext.create(settings, celery)
    return RegistryServer(
        ctx,
        "registry",
        [
            ServiceRegistration(
                registry_pb2_grpc.add_RegistryServiceServicer_to_server,
                RegistryServicer(ctx),
                "loraserve.api.v1.RegistryService",
            ),
            ServiceRegistration(
                jobs_pb2_grpc.add_JobServiceServicer_to_server,
                JobServicer(ctx),
                "loraserve.api.v1.JobService",
            ),
        ],
        host=settings.host,
        port=settings.port,
        auth=TokenAuth(common.read_token, common.write_token, common.admin_token),
    )
