"""Async gRPC server bootstrap shared by every service.

Every server gets: ``grpc.health.v1`` (per service and overall), server reflection, the error
interceptor (domain errors -> status with ``google.rpc`` details, unexpected exceptions ->
INTERNAL without leaking internals), request logging, optional bearer-token auth, and graceful
shutdown on SIGTERM / SIGINT.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from loraserve.auth import TokenAuth
from loraserve.errors import Internal, LoraserveError

log = logging.getLogger("loraserve.server")

# Adapter uploads stream 1 MiB chunks; 8 MiB leaves room for headers and sample inputs.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024


@dataclass(slots=True)
class ServiceRegistration:
    """One servicer to add: ``add_fn(servicer, server)`` and its full name, for health/reflection."""

    add_fn: Callable[[Any, grpc.aio.Server], None]
    servicer: Any
    full_name: str


class DomainInterceptor(grpc.aio.ServerInterceptor):
    """Auth check, domain-error mapping and one log line per call, for all four RPC shapes."""

    def __init__(self, auth: TokenAuth, service_name: str):
        self._auth = auth
        self._service = service_name

    async def intercept_service(self, continuation, details):  # type: ignore[override]
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        metadata = {k: v for k, v in (details.invocation_metadata or ()) if isinstance(v, str)}
        if handler.response_streaming:
            kind = "stream_stream" if handler.request_streaming else "unary_stream"
            wrapped = self._wrap_stream(getattr(handler, kind), method, metadata)
        else:
            kind = "stream_unary" if handler.request_streaming else "unary_unary"
            wrapped = self._wrap_unary(getattr(handler, kind), method, metadata)
        return handler._replace(**{kind: wrapped})

    def _wrap_unary(self, behavior, method: str, metadata: dict[str, str]):
        async def wrapped(request, context):
            start = time.perf_counter()
            code = "OK"
            try:
                self._auth.check(method, metadata)
                return await behavior(request, context)
            except Exception as exc:  # noqa: BLE001 - mapped to a status below
                code = await _abort(context, exc, method)
            finally:
                _log_call(method, code, start)

        return wrapped

    def _wrap_stream(self, behavior, method: str, metadata: dict[str, str]):
        async def wrapped(request, context):
            start = time.perf_counter()
            code = "OK"
            try:
                self._auth.check(method, metadata)
                async for item in behavior(request, context):
                    yield item
            except Exception as exc:  # noqa: BLE001 - mapped to a status below
                code = await _abort(context, exc, method)
            finally:
                _log_call(method, code, start)

        return wrapped


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> str:
    """Map an exception to a status and abort the call; returns the code name for the log."""
    if isinstance(exc, grpc.aio.AbortError):  # the servicer aborted itself
        raise exc
    if isinstance(exc, LoraserveError):
        err = exc
    else:
        log.exception("unhandled error in %s", method)
        err = Internal(f"internal error ({type(exc).__name__})")
    await context.abort_with_status(err.to_status())
    return err.code.name  # unreachable: abort raises


def _log_call(method: str, code: str, start: float) -> None:
    if method.startswith("/grpc."):
        return
    log.info(
        "rpc",
        extra={"method": method, "code": code, "ms": round((time.perf_counter() - start) * 1e3, 2)},
    )


class GrpcServer:
    """An async gRPC server with health, reflection and the shared interceptor."""

    def __init__(
        self,
        name: str,
        services: Sequence[ServiceRegistration],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        auth: TokenAuth | None = None,
        serving_at_start: bool = True,
    ):
        self.name = name
        self.services = list(services)
        self.host = host
        self.requested_port = port
        self.port = 0
        self.health = health.aio.HealthServicer()
        self._serving_at_start = serving_at_start
        self._auth = auth or TokenAuth()
        self._server: grpc.aio.Server | None = None
        self.on_stop: list[Callable[[], Awaitable[None]]] = []

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> int:
        server = grpc.aio.server(
            interceptors=[DomainInterceptor(self._auth, self.name)],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ],
        )
        for reg in self.services:
            reg.add_fn(reg.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = [reg.full_name for reg in self.services]
        reflection.enable_server_reflection(
            names + [health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )
        self.port = server.add_insecure_port(f"{self.host}:{self.requested_port}")
        if self.port == 0:
            raise RuntimeError(f"{self.name}: could not bind {self.host}:{self.requested_port}")
        await server.start()
        self._server = server
        await self.set_serving(self._serving_at_start)
        log.info("server started", extra={"server": self.name, "address": self.address})
        return self.port

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *(reg.full_name for reg in self.services)]:
            await self.health.set(name, status)

    async def stop(self, grace: float = 5.0) -> None:
        if self._server is None:
            return
        await self.health.enter_graceful_shutdown()
        await self._server.stop(grace)
        self._server = None
        for hook in self.on_stop:
            await hook()
        log.info("server stopped", extra={"server": self.name})

    async def wait_for_termination(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()


async def run_until_signal(servers: Sequence[GrpcServer], grace: float = 5.0) -> None:
    """Start the servers and block until SIGTERM/SIGINT, then stop them gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    for server in servers:
        if server._server is None:
            await server.start()
    await stop.wait()
    for server in servers:
        await server.stop(grace)
