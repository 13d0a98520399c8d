"""``loraserve status``: what a person needs to see about a running stack."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Group
from rich.table import Table

from loraserve.api.v1 import executor_pb2, executor_pb2_grpc
from loraserve.requests import STATUS_NAMES
from loraserve.settings import CommonSettings
from loraserve.stack import StackInfo


def _health(address: str) -> str:
    try:
        with grpc.insecure_channel(address) as channel:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=2
            )
            return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    except grpc.RpcError as exc:
        return f"unreachable ({exc.code().name})"


def collect_status(data_dir: Path) -> Group:
    from loraserve.client import Client

    info = StackInfo.load(data_dir)
    common = CommonSettings()
    registry = info.registry if info else common.registry_address
    retriever = info.retriever if info else common.retriever_address
    executors = [info.executor] if info else common.executor_addresses

    services = Table("service", "address", "health", title="services")
    for name, address in [
        ("registry", registry),
        ("retriever", retriever),
        *(("executor", e) for e in executors),
    ]:
        services.add_row(name, address, _health(address))

    load = Table(
        "executor",
        "device",
        "queue",
        "running",
        "slots free",
        "KV blocks free",
        "resident adapters",
        "merged",
        title="executors",
    )
    for address in executors:
        try:
            with grpc.insecure_channel(address) as channel:
                s = executor_pb2_grpc.ExecutorServiceStub(channel).GetStats(
                    executor_pb2.GetStatsRequest(), timeout=2
                )
            resident = ", ".join(f"{a.adapter_id}@{a.version}" for a in s.resident_adapters) or "-"
            load.add_row(
                address,
                s.device,
                str(s.queue_depth),
                str(s.running_requests),
                f"{s.adapter_slots_free}/{s.adapter_slots_total}",
                f"{s.kv_blocks_free}/{s.kv_blocks_total}",
                resident,
                s.merged_adapter_id or "-",
            )
        except grpc.RpcError as exc:
            load.add_row(address, "-", "-", "-", "-", "-", f"unreachable ({exc.code().name})", "-")

    pool = Table("status", "adapters", title="adapter pool")
    try:
        with Client(registry, retriever) as client:
            counts = Counter(STATUS_NAMES[a.status] for a in client.adapters(page_size=1000))
        for name, n in sorted(counts.items()):
            pool.add_row(name, str(n))
    except Exception as exc:  # noqa: BLE001 - status must render whatever is down
        pool.add_row("unavailable", str(exc))
    return Group(services, load, pool)
