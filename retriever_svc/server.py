"""Retriever gRPC server."""

from __future__ import annotations

from loraserve.api.v1 import retriever_pb2_grpc
from loraserve.auth import TokenAuth
from loraserve.server import GrpcServer, ServiceRegistration
from retriever_svc.settings import RetrieverSettings


class RetrieverServicer(retriever_pb2_grpc.RetrieverServiceServicer):
    def __init__(self, settings: RetrieverSettings):
        self.settings = settings


def build_server(settings: RetrieverSettings) -> GrpcServer:
    common = settings.common
    return GrpcServer(
        "retriever",
        [
            ServiceRegistration(
                retriever_pb2_grpc.add_RetrieverServiceServicer_to_server,
                RetrieverServicer(settings),
                "loraserve.api.v1.RetrieverService",
            )
        ],
        host=settings.host,
        port=settings.port,
        auth=TokenAuth(common.read_token, common.write_token, common.admin_token),
    )
