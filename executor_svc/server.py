"""Executor gRPC server."""

from __future__ import annotations

from executor_svc.settings import ExecutorSettings
from loraserve.api.v1 import executor_pb2_grpc
from loraserve.auth import TokenAuth
from loraserve.server import GrpcServer, ServiceRegistration


class ExecutorServicer(executor_pb2_grpc.ExecutorServiceServicer):
    def __init__(self, settings: ExecutorSettings):
        self.settings = settings


def build_server(settings: ExecutorSettings) -> GrpcServer:
    common = settings.common
    return GrpcServer(
        "executor",
        [
            ServiceRegistration(
                executor_pb2_grpc.add_ExecutorServiceServicer_to_server,
                ExecutorServicer(settings),
                "loraserve.api.v1.ExecutorService",
            )
        ],
        host=settings.host,
        port=settings.port,
        auth=TokenAuth(common.read_token, common.write_token, common.admin_token),
    )
