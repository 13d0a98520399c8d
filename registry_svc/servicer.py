"""RegistryService: thin RPC handlers over the registry's modules (one per concern)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from loraserve.api.v1 import registry_pb2, registry_pb2_grpc
from loraserve.errors import NotFound
from registry_svc.basemodels import get_base_model, parse_config, register_base_model
from registry_svc.context import RegistryContext
from registry_svc.convert import adapter_to_proto, base_model_to_proto, status_name
from registry_svc.download import download_adapter
from registry_svc.lifecycle import delete_versions
from registry_svc.names import check_adapter_id, check_base_model_id
from registry_svc.paging import decode_token, encode_token
from registry_svc.push import push_adapter
from registry_svc.store import AdapterQuery, get_adapter, list_adapters
from registry_svc.watch import watch_adapters

R = registry_pb2
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 100, 1000


def to_query(f: registry_pb2.AdapterFilter) -> AdapterQuery:
    return AdapterQuery(
        base_model=f.base_model,
        statuses=[status_name(s) for s in f.statuses if s],
        tags=list(f.tags),
        domain=f.domain,
        adapter_id_prefix=f.adapter_id_prefix,
        include_deleted=f.include_deleted,
    )


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    def __init__(self, ctx: RegistryContext):
        self.ctx = ctx

    async def PushAdapter(self, request_iterator, context) -> R.PushAdapterResponse:
        row, job = await push_adapter(self.ctx, request_iterator)
        return R.PushAdapterResponse(adapter=adapter_to_proto(row), job_id=job.job_id)

    async def GetAdapter(self, request, context) -> R.GetAdapterResponse:
        check_adapter_id(request.adapter_id)
        row = await asyncio.to_thread(get_adapter, self.ctx.db, request.adapter_id, request.version)
        if row is None:
            what = f"{request.adapter_id}@{request.version or 'latest'}"
            raise NotFound(f"adapter {what} not found", resource_type="adapter", resource_name=what)
        return R.GetAdapterResponse(adapter=adapter_to_proto(row))

    async def ListAdapters(self, request, context) -> R.ListAdaptersResponse:
        query = to_query(request.filter)
        after = decode_token(query, request.page_token)
        size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        rows, total = await asyncio.to_thread(
            list_adapters, self.ctx.db, query, after=after, limit=size + 1
        )
        more = len(rows) > size
        rows = rows[:size]
        token = encode_token(query, rows[-1].adapter_id, rows[-1].version) if more else ""
        return R.ListAdaptersResponse(
            adapters=[adapter_to_proto(r) for r in rows], next_page_token=token, total_size=total
        )

    async def DeleteAdapter(self, request, context) -> R.DeleteAdapterResponse:
        check_adapter_id(request.adapter_id)
        rows = await asyncio.to_thread(
            delete_versions, self.ctx, request.adapter_id, request.version
        )
        return R.DeleteAdapterResponse(deleted=[adapter_to_proto(r) for r in rows])

    async def WatchAdapters(self, request, context) -> AsyncIterator[R.WatchAdaptersResponse]:
        async for event in watch_adapters(
            self.ctx, to_query(request.filter), request.send_initial_state
        ):
            yield event

    async def DownloadAdapter(self, request, context) -> AsyncIterator[R.DownloadAdapterResponse]:
        async for message in download_adapter(self.ctx, request):
            yield message

    async def RegisterBaseModel(self, request, context) -> R.RegisterBaseModelResponse:
        check_base_model_id(request.base_model_id, "base_model_id")
        info = parse_config(request.base_model_id, request.config_json)
        info = await asyncio.to_thread(register_base_model, self.ctx.db, info)
        return R.RegisterBaseModelResponse(base_model=base_model_to_proto(info))

    async def GetBaseModel(self, request, context) -> R.GetBaseModelResponse:
        check_base_model_id(request.base_model_id, "base_model_id")
        info = await asyncio.to_thread(get_base_model, self.ctx.db, request.base_model_id)
        if info is None:
            raise NotFound(
                f"base model {request.base_model_id!r} not found",
                resource_type="base_model",
                resource_name=request.base_model_id,
            )
        return R.GetBaseModelResponse(base_model=base_model_to_proto(info))
