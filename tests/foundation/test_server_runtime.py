"""Every service answers health checks and reflection; errors carry google.rpc details; auth."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from loraserve.api.v1 import registry_pb2, registry_pb2_grpc
from loraserve.auth import TokenAuth
from loraserve.errors import (
    FieldViolation,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    from_rpc_error,
    parse_rpc_error,
)
from loraserve.server import GrpcServer, ServiceRegistration


async def _reflected_services(channel: grpc.aio.Channel) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def one_request():
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    async for response in stub.ServerReflectionInfo(one_request()):
        return {s.name for s in response.list_services_response.service}
    return set()


class _ErroringRegistry(registry_pb2_grpc.RegistryServiceServicer):
    """A RegistryService whose GetAdapter raises the domain error named by adapter_id."""

    async def GetAdapter(self, request, context):
        if request.adapter_id == "bad":
            raise InvalidArgument(
                "bad adapter_id", [FieldViolation("adapter_id", "must not be 'bad'")]
            )
        if request.adapter_id == "full":
            raise ResourceExhausted("queue full", retry_after_s=2.5)
        if request.adapter_id == "boom":
            raise RuntimeError("secret internal detail")
        if request.adapter_id == "ok":
            return registry_pb2.GetAdapterResponse()
        raise NotFound(f"adapter {request.adapter_id!r} not found", resource_type="adapter")

    async def WatchAdapters(self, request, context):
        yield registry_pb2.WatchAdaptersResponse(sequence=1)
        raise NotFound("gone mid-stream")

    async def PushAdapter(self, request_iterator, context):
        async for _ in request_iterator:
            pass
        return registry_pb2.PushAdapterResponse()


def _server(auth: TokenAuth | None = None) -> GrpcServer:
    return GrpcServer(
        "test",
        [
            ServiceRegistration(
                registry_pb2_grpc.add_RegistryServiceServicer_to_server,
                _ErroringRegistry(),
                "loraserve.api.v1.RegistryService",
            )
        ],
        auth=auth,
    )


def _skeletons():
    from executor_svc.server import build_server as executor_server
    from executor_svc.settings import ExecutorSettings
    from registry_svc.server import build_server as registry_server
    from registry_svc.settings import RegistrySettings
    from retriever_svc.server import build_server as retriever_server
    from retriever_svc.settings import RetrieverSettings

    return [
        (
            "registry",
            registry_server,
            RegistrySettings,
            {"loraserve.api.v1.RegistryService", "loraserve.api.v1.JobService"},
        ),
        ("retriever", retriever_server, RetrieverSettings, {"loraserve.api.v1.RetrieverService"}),
        ("executor", executor_server, ExecutorSettings, {"loraserve.api.v1.ExecutorService"}),
    ]


@pytest.mark.parametrize("name", ["registry", "retriever", "executor"])
async def test_service_health_and_reflection(
    name, tmp_path, serve, channel_to, tiny_model_dir, monkeypatch
):
    monkeypatch.setenv("LORASERVE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("LORASERVE_EXECUTOR_MODEL_DIR", str(tiny_model_dir))
    _, build, settings_cls, expected = next(s for s in _skeletons() if s[0] == name)
    settings = settings_cls(port=0)
    async with serve(build(settings)) as srv, channel_to(srv.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        # The executor reports NOT_SERVING until warm; wait (bounded) for SERVING.
        for service in ["", *sorted(expected)]:
            for _ in range(600):
                resp = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    break
                import asyncio

                await asyncio.sleep(0.1)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING, service
        services = await _reflected_services(ch)
        assert expected <= services
        assert "grpc.health.v1.Health" in services


async def test_domain_errors_map_to_status_with_details(serve, channel_to):
    async with serve(_server()) as srv, channel_to(srv.address) as ch:
        stub = registry_pb2_grpc.RegistryServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await stub.GetAdapter(registry_pb2.GetAdapterRequest(adapter_id="bad"))
        info = parse_rpc_error(bad.value)
        assert info.code == grpc.StatusCode.INVALID_ARGUMENT
        assert [(v.field, v.description) for v in info.violations] == [
            ("adapter_id", "must not be 'bad'")
        ]

        with pytest.raises(grpc.aio.AioRpcError) as full:
            await stub.GetAdapter(registry_pb2.GetAdapterRequest(adapter_id="full"))
        err = from_rpc_error(full.value)
        assert isinstance(err, ResourceExhausted) and err.retry_after_s == pytest.approx(2.5)

        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.GetAdapter(registry_pb2.GetAdapterRequest(adapter_id="nope"))
        assert isinstance(from_rpc_error(missing.value), NotFound)

        with pytest.raises(grpc.aio.AioRpcError) as boom:
            await stub.GetAdapter(registry_pb2.GetAdapterRequest(adapter_id="boom"))
        assert boom.value.code() == grpc.StatusCode.INTERNAL
        assert "secret" not in boom.value.details()

        events = []
        with pytest.raises(grpc.aio.AioRpcError) as mid:
            async for ev in stub.WatchAdapters(registry_pb2.WatchAdaptersRequest()):
                events.append(ev.sequence)
        assert events == [1] and mid.value.code() == grpc.StatusCode.NOT_FOUND


AUTH_CASES = [
    # (token, method, expected code)
    (None, "GetAdapter", grpc.StatusCode.UNAUTHENTICATED),
    ("wrong", "GetAdapter", grpc.StatusCode.UNAUTHENTICATED),
    ("r", "GetAdapter", grpc.StatusCode.OK),
    ("r", "PushAdapter", grpc.StatusCode.PERMISSION_DENIED),
    ("w", "PushAdapter", grpc.StatusCode.OK),
    ("a", "PushAdapter", grpc.StatusCode.OK),
]


@pytest.mark.parametrize(("token", "method", "expected"), AUTH_CASES)
async def test_bearer_token_levels(token, method, expected, serve, channel_to):
    async with (
        serve(_server(TokenAuth(read="r", write="w", admin="a"))) as srv,
        channel_to(srv.address) as ch,
    ):
        stub = registry_pb2_grpc.RegistryServiceStub(ch)
        md = [("authorization", f"Bearer {token}")] if token else []
        try:
            if method == "GetAdapter":
                await stub.GetAdapter(registry_pb2.GetAdapterRequest(adapter_id="ok"), metadata=md)
            else:

                async def reqs():
                    yield registry_pb2.PushAdapterRequest()

                await stub.PushAdapter(reqs(), metadata=md)
            code = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
        assert code == expected
        # Health stays open without a token.
        resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
