"""PushAdapter: upload → validate → commit blobs → PENDING record → ingestion task.

Nothing of a refused upload stays behind: spools are removed in ``finally``; blobs are
committed only after validation passed, and un-committed again (garbage-collected under the
blob store's lock) if the record cannot be inserted (e.g. the version exists).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from loraserve.api.v1 import registry_pb2
from loraserve.errors import FailedPrecondition, InvalidArgument
from registry_svc.basemodels import get_base_model
from registry_svc.context import RegistryContext
from registry_svc.ingest_dispatch import dispatch_ingest
from registry_svc.jobs import JobRecord
from registry_svc.models import AdapterRow
from registry_svc.names import CONFIG_FILE, WEIGHTS_FILE, check_base_model_id
from registry_svc.store import NewAdapter, create_adapter, referenced_blobs
from registry_svc.upload import Upload, receive_upload
from registry_svc.validation import ValidatedAdapter, validate_adapter


async def push_adapter(
    ctx: RegistryContext, requests: AsyncIterator[registry_pb2.PushAdapterRequest]
) -> tuple[AdapterRow, JobRecord]:
    upload = await receive_upload(requests, ctx.settings, ctx.blobs)
    handed_over = False
    try:
        for spool in upload.spools.values():
            spool.finish()
        config_bytes = upload.spools[CONFIG_FILE].path.read_bytes()
        base_model_id = upload.header.base_model or _config_base_model(config_bytes)
        check_base_model_id(base_model_id, "header.base_model")
        base = await asyncio.to_thread(get_base_model, ctx.db, base_model_id)
        if base is None:
            raise FailedPrecondition(
                f"base model {base_model_id!r} is not registered; call RegisterBaseModel first"
            )
        validated = await asyncio.to_thread(
            validate_adapter,
            config_bytes,
            upload.spools[WEIGHTS_FILE].path,
            base,
            max_rank=ctx.settings.max_rank,
            max_header_bytes=ctx.settings.max_header_bytes,
        )
        new = _new_adapter(upload, base_model_id, validated)
        # From here on the upload is complete and valid: a client that cancels now does not
        # stop it half-way (a record without its ingestion job); the thread cleans up.
        handed_over = True
        return await asyncio.shield(asyncio.to_thread(_commit_record_dispatch, ctx, upload, new))
    finally:
        if not handed_over:
            upload.discard()


def _config_base_model(config_bytes: bytes) -> str:
    try:
        value = json.loads(config_bytes).get("base_model_name_or_path") or ""
    except (ValueError, AttributeError):
        value = ""
    if not value:
        raise InvalidArgument.field(
            "header.base_model", "is required (adapter_config.json names no base model)"
        )
    return str(value)


def _new_adapter(upload: Upload, base_model_id: str, v: ValidatedAdapter) -> NewAdapter:
    h = upload.header
    files = [
        {"name": name, "size": spool.size, "sha256": spool.hexdigest()}
        for name, spool in sorted(upload.spools.items())
    ]
    weights = upload.spools[WEIGHTS_FILE]
    return NewAdapter(
        adapter_id=h.adapter_id,
        version=h.version,
        base_model=base_model_id,
        files=files,
        sha256=weights.hexdigest(),
        size_bytes=sum(f["size"] for f in files),
        rank=v.spec.r,
        lora_alpha=v.spec.lora_alpha,
        use_rslora=v.spec.use_rslora,
        target_modules=v.target_modules,
        module_scales=[[s.module, s.rank, s.alpha, s.scale] for s in v.module_scales],
        dtype=v.dtype,
        tags=sorted(set(h.tags)),
        domain=h.domain,
        description=h.description,
        sample_inputs=list(h.sample_inputs),
    )


def _commit_record_dispatch(
    ctx: RegistryContext, upload: Upload, new: NewAdapter
) -> tuple[AdapterRow, JobRecord]:
    try:
        with ctx.blobs.lock:
            shas = [ctx.blobs.commit(spool) for spool in upload.spools.values()]
            try:
                row = create_adapter(ctx.db, new)
            except BaseException:
                ctx.blobs.delete_unreferenced(referenced_blobs(ctx.db), candidates=shas)
                raise
    finally:
        upload.discard()
    return row, dispatch_ingest(ctx.celery, ctx.db, row)
