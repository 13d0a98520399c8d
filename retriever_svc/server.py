"""Retriever gRPC server: Retrieve (plans), Explain (scored candidates), Route (replica)."""

from __future__ import annotations

import asyncio

from loraserve import vectors as V
from loraserve.api.v1 import retriever_pb2, retriever_pb2_grpc
from loraserve.auth import TokenAuth
from loraserve.server import GrpcServer, ServiceRegistration
from retriever_svc.active_model import ActiveModel, shared_pool
from retriever_svc.base_models import BaseModelCheck
from retriever_svc.retrieval import retrieve
from retriever_svc.routing import Router
from retriever_svc.scoring import Scored
from retriever_svc.settings import RetrieverSettings
from retriever_svc.validation import Query, check_explain, check_retrieve, check_route


class RetrieverServicer(retriever_pb2_grpc.RetrieverServiceServicer):
    def __init__(self, settings: RetrieverSettings):
        common = settings.common
        self.settings = settings
        self.active = ActiveModel(
            common, shared_pool(settings.instruction_prefix, settings.embedding_cache_size)
        )
        self.base_models = BaseModelCheck(
            common.registry_address, ttl_s=settings.base_model_ttl_s, token=common.client_token
        )
        self.router = Router(
            common.executor_addresses,
            ttl_s=settings.stats_ttl_s,
            timeout_s=settings.stats_timeout_s,
            slack=settings.route_load_slack,
            token=common.client_token,
        )

    async def _run(self, query: Query):
        index = await asyncio.to_thread(self.active.current)
        client = V.open_qdrant(self.settings.common)
        await self.base_models.require(client, index.collection, query.search.base_model)
        results = await asyncio.to_thread(retrieve, self.settings, index, query)
        return index, results

    async def Retrieve(self, request, context):  # noqa: N802 - gRPC method name
        query = check_retrieve(request, self.settings)
        index, results = await self._run(query)
        resp = retriever_pb2.RetrieveResponse(embedding_model=index.embedder.model_id)
        for i, r in enumerate(results):
            resp.plans.add(
                prompt_index=i,
                plan=r.plan,
                candidates=[_scored(c) for c in r.candidates],
                truncated=r.truncated,
                below_min_score=r.below_min_score,
            )
        return resp

    async def Explain(self, request, context):  # noqa: N802
        query = check_explain(request, self.settings)
        index, results = await self._run(query)
        return retriever_pb2.ExplainResponse(
            candidates=[_scored(c) for c in results[0].candidates],
            embedding_model=index.embedder.model_id,
            min_score=query.plan.min_score,
            truncated=results[0].truncated,
        )

    async def Route(self, request, context):  # noqa: N802
        check_route(request)
        choice = await self.router.route(request.plan, request.base_model)
        return retriever_pb2.RouteResponse(
            replica_id=choice.replica.replica_id,
            address=choice.replica.address,
            reason=choice.reason,
        )

    async def close(self) -> None:
        await self.router.close()
        await self.base_models.close()


def _scored(c: Scored) -> retriever_pb2.ScoredAdapter:
    return retriever_pb2.ScoredAdapter(
        adapter_id=c.adapter_id,
        version=c.version,
        score=c.score,
        centroid_score=c.centroid_score,
        sample_score=c.sample_score,
        domain=c.domain,
    )


def build_server(settings: RetrieverSettings) -> GrpcServer:
    common = settings.common
    servicer = RetrieverServicer(settings)
    server = GrpcServer(
        "retriever",
        [
            ServiceRegistration(
                retriever_pb2_grpc.add_RetrieverServiceServicer_to_server,
                servicer,
                "loraserve.api.v1.RetrieverService",
            )
        ],
        host=settings.host,
        port=settings.port,
        auth=TokenAuth(common.read_token, common.write_token, common.admin_token),
    )
    server.on_stop.append(servicer.close)
    return server
