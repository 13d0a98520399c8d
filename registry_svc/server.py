"""Registry gRPC server: RegistryService and JobService in one process."""

from __future__ import annotations

from loraserve.api.v1 import jobs_pb2_grpc, registry_pb2_grpc
from loraserve.auth import TokenAuth
from loraserve.server import GrpcServer, ServiceRegistration
from registry_svc.settings import RegistrySettings


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    def __init__(self, settings: RegistrySettings):
        self.settings = settings


class JobServicer(jobs_pb2_grpc.JobServiceServicer):
    def __init__(self, settings: RegistrySettings):
        self.settings = settings


def build_server(settings: RegistrySettings) -> GrpcServer:
    common = settings.common
    return GrpcServer(
        "registry",
        [
            ServiceRegistration(
                registry_pb2_grpc.add_RegistryServiceServicer_to_server,
                RegistryServicer(settings),
                "loraserve.api.v1.RegistryService",
            ),
            ServiceRegistration(
                jobs_pb2_grpc.add_JobServiceServicer_to_server,
                JobServicer(settings),
                "loraserve.api.v1.JobService",
            ),
        ],
        host=settings.host,
        port=settings.port,
        auth=TokenAuth(common.read_token, common.write_token, common.admin_token),
    )
