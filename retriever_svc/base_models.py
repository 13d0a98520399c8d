"""Is a base model known? Unknown base models are NOT_FOUND, not an empty answer.

A base model is known when the active collection holds a point of it (the common case, no
RPC), or else when the registry's ``GetBaseModel`` finds it (registered, no READY adapters
yet: plans are then the base model). Answers are cached for ``ttl_s``; a registry that cannot be
reached while no point of the base model exists is UNAVAILABLE (we cannot tell).
"""

from __future__ import annotations

import time

import grpc
from qdrant_client import QdrantClient, models

from loraserve import vectors as V
from loraserve.api.v1 import registry_pb2, registry_pb2_grpc
from loraserve.errors import NotFound, Unavailable


class BaseModelCheck:
    def __init__(
        self, registry_address: str, *, ttl_s: float, token: str = "", timeout_s: float = 2.0
    ):
        self._address = registry_address
        self._ttl = ttl_s
        self._timeout = timeout_s
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._known: dict[str, float] = {}
        self._channel: grpc.aio.Channel | None = None

    async def require(self, client: QdrantClient, collection: str | None, base_model: str) -> None:
        """Return if ``base_model`` is known; raise NotFound / Unavailable otherwise."""
        seen = self._known.get(base_model)
        if seen is not None and time.monotonic() - seen < self._ttl:
            return
        if collection is not None and _has_points(client, collection, base_model):
            self._known[base_model] = time.monotonic()
            return
        await self._ask_registry(base_model)
        self._known[base_model] = time.monotonic()

    async def _ask_registry(self, base_model: str) -> None:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self._address)
        stub = registry_pb2_grpc.RegistryServiceStub(self._channel)
        try:
            await stub.GetBaseModel(
                registry_pb2.GetBaseModelRequest(base_model_id=base_model),
                timeout=self._timeout,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound(
                    f"unknown base model {base_model!r}: no adapters of it and not registered",
                    resource_type="base_model",
                    resource_name=base_model,
                ) from None
            raise Unavailable(
                f"no adapters of base model {base_model!r}, and the registry at {self._address} "
                f"could not confirm it exists ({exc.code().name}: {exc.details()})"
            ) from None

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


def _has_points(client: QdrantClient, collection: str, base_model: str) -> bool:
    flt = models.Filter(
        must=[models.FieldCondition(key=V.P_BASE_MODEL, match=models.MatchValue(value=base_model))]
    )
    points, _ = client.scroll(collection, scroll_filter=flt, limit=1, with_payload=False)
    return bool(points)
