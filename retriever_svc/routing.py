"""Route: pick the executor replica for a plan by adapter residency and load (dLoRA dispatch).

Each replica's ``GetStats`` is fetched concurrently (deadline ``stats_timeout_s``) and reused
for ``stats_ttl_s``. Choice, among the replicas that answered and report the plan's base model
(all that answered when none does: executors name their model after its directory):

    load(r)     = queue_depth + running_requests
    resident(r) = how many of the plan's adapters r holds (GPU or host)
    merged(r)   = +1 if the plan is the adapter r has folded into its base weights (merged
                  mode: no LoRA work), -1 if r has another one merged (the plan's tokens would
                  subtract it, and one more such request keeps it merged), else 0
    best        = max resident, then max merged, then min load, then address
    least       = min load, then max resident, then address
    pick best, unless load(best) - load(least) > slack: then least ("moved off overloaded")

Based on: dLoRA (Wu et al., OSDI 2024), whose dispatcher places requests by adapter
placement and migrates work off overloaded replicas.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

from loraserve.api.v1 import common_pb2, executor_pb2, executor_pb2_grpc
from loraserve.errors import Unavailable


@dataclass(frozen=True, slots=True)
class ReplicaStats:
    address: str
    replica_id: str
    base_model: str
    queue_depth: int
    running_requests: int
    resident: frozenset[tuple[str, int]] = field(default_factory=frozenset)
    merged: str = ""  # adapter id folded into the base weights, "" when unmerged

    @property
    def load(self) -> int:
        return self.queue_depth + self.running_requests

    @classmethod
    def from_proto(cls, address: str, s: executor_pb2.GetStatsResponse) -> ReplicaStats:
        return cls(
            address=address,
            replica_id=s.replica_id or address,
            base_model=s.base_model,
            queue_depth=s.queue_depth,
            running_requests=s.running_requests,
            resident=frozenset((a.adapter_id, a.version) for a in s.resident_adapters),
            merged=s.merged_adapter_id,
        )

    def holds(self, adapter_id: str, version: int) -> bool:
        if version:
            return (adapter_id, version) in self.resident
        return any(a == adapter_id for a, _ in self.resident)


@dataclass(frozen=True, slots=True)
class Choice:
    replica: ReplicaStats
    reason: str


def choose_replica(
    replicas: Sequence[ReplicaStats], plan: common_pb2.LoraPlan, *, slack: int
) -> Choice:
    """The replica to run ``plan`` on; ``replicas`` must be non-empty."""
    wanted = [(a.adapter_id, a.version) for a in plan.adapters]

    def resident(r: ReplicaStats) -> int:
        return sum(r.holds(a, v) for a, v in wanted)

    def merged(r: ReplicaStats) -> int:
        if not r.merged:
            return 0
        return 1 if [a for a, _ in wanted] == [r.merged] else -1

    best = min(replicas, key=lambda r: (-resident(r), -merged(r), r.load, r.address))
    least = min(replicas, key=lambda r: (r.load, -resident(r), r.address))
    n = resident(best)
    if best is not least and best.load - least.load > slack:
        return Choice(
            least,
            f"least loaded (load {least.load}); moved off {best.replica_id} "
            f"(load {best.load}) holding {n}/{len(wanted)} adapters",
        )
    if merged(best) == 1:
        return Choice(best, f"adapter merged into the base weights, load {best.load}")
    if wanted and n == len(wanted):
        return Choice(best, f"adapters resident ({n}/{len(wanted)}), load {best.load}")
    if n:
        return Choice(best, f"adapters partly resident ({n}/{len(wanted)}), load {best.load}")
    # Nothing resident anywhere: a replica as loaded or less lost on its merged adapter alone.
    passed = [r for r in replicas if merged(r) < merged(best) and r.load <= best.load]
    if passed:
        return Choice(
            best,
            f"no other adapter merged (load {best.load}); {passed[0].replica_id} "
            f"(load {passed[0].load}) has {passed[0].merged} merged",
        )
    return Choice(best, f"least loaded (load {best.load})")


class Router:
    """Executor stats with a short cache, and the Route decision."""

    def __init__(
        self,
        addresses: Sequence[str],
        *,
        ttl_s: float,
        timeout_s: float,
        slack: int,
        token: str = "",
    ):
        self._addresses = list(addresses)
        self._ttl = ttl_s
        self._timeout = timeout_s
        self._slack = slack
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._cache: tuple[float, list[ReplicaStats], dict[str, str]] | None = None
        self._lock = asyncio.Lock()

    async def route(self, plan: common_pb2.LoraPlan, base_model: str) -> Choice:
        stats, errors = await self.stats()
        if not stats:
            detail = "; ".join(f"{a}: {e}" for a, e in errors.items()) or "none configured"
            raise Unavailable(
                f"no executor replica answered GetStats ({detail})",
                metadata={a: e[:200] for a, e in errors.items()},
            )
        serving = [r for r in stats if r.base_model == base_model]
        if serving or not base_model:
            return choose_replica(serving or stats, plan, slack=self._slack)
        # Executors name their model after its directory, which need not be the registry's base
        # model id: route among all replicas, and say that the base model was not matched.
        choice = choose_replica(stats, plan, slack=self._slack)
        served = ", ".join(sorted({r.base_model or "?" for r in stats}))
        return Choice(
            choice.replica,
            f"{choice.reason}; no replica reports base model {base_model!r} (they report {served})",
        )

    async def stats(self) -> tuple[list[ReplicaStats], dict[str, str]]:
        """Fresh-enough stats of every replica that answers, and the errors of the others."""
        async with self._lock:
            now = time.monotonic()
            if self._cache is not None and now - self._cache[0] < self._ttl:
                return self._cache[1], self._cache[2]
            results = await asyncio.gather(*(self._fetch(a) for a in self._addresses))
            stats = [r for r in results if isinstance(r, ReplicaStats)]
            errors = {
                a: r for a, r in zip(self._addresses, results, strict=True) if isinstance(r, str)
            }
            self._cache = (time.monotonic(), stats, errors)
            return stats, errors

    async def _fetch(self, address: str) -> ReplicaStats | str:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(address)
        stub = executor_pb2_grpc.ExecutorServiceStub(channel)
        try:
            resp = await stub.GetStats(
                executor_pb2.GetStatsRequest(), timeout=self._timeout, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
        return ReplicaStats.from_proto(address, resp)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
