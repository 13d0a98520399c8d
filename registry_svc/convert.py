"""Rows of the SQL store → API messages (one place, so every RPC shows the same fields)."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from loraserve.api.v1 import common_pb2, jobs_pb2, registry_pb2
from registry_svc.basemodels import BaseModelInfo
from registry_svc.jobs import JobRecord
from registry_svc.models import AdapterRow

PENDING, VALIDATING, EMBEDDING, READY, FAILED, DELETED = (
    "PENDING",
    "VALIDATING",
    "EMBEDDING",
    "READY",
    "FAILED",
    "DELETED",
)
STATUSES = (PENDING, VALIDATING, EMBEDDING, READY, FAILED, DELETED)


def status_enum(name: str) -> int:
    return common_pb2.AdapterStatus.Value(f"ADAPTER_STATUS_{name}")


def status_name(value: int) -> str:
    return common_pb2.AdapterStatus.Name(value).removeprefix("ADAPTER_STATUS_")


def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def adapter_to_proto(row: AdapterRow) -> common_pb2.Adapter:
    meta = common_pb2.AdapterMetadata(
        base_model=row.base_model,
        rank=row.rank,
        lora_alpha=row.lora_alpha,
        target_modules=list(row.target_modules or []),
        module_scales=[
            common_pb2.ModuleScale(module=m, rank=int(r), alpha=float(a), scale=float(s))
            for m, r, a, s in (row.module_scales or [])
        ],
        use_rslora=row.use_rslora,
        size_bytes=row.size_bytes,
        sha256=row.sha256,
        tags=list(row.tags or []),
        domain=row.domain,
        sample_inputs_count=len(row.sample_inputs or []),
        description=row.description,
        files=[
            common_pb2.FileInfo(name=f["name"], size_bytes=int(f["size"]), sha256=f["sha256"])
            for f in (row.files or [])
        ],
        dtype=row.dtype,
    )
    return common_pb2.Adapter(
        adapter_id=row.adapter_id,
        version=row.version,
        status=status_enum(row.status),
        failure_reason=row.failure_reason or "",
        metadata=meta,
        create_time=timestamp(row.create_time),
        update_time=timestamp(row.update_time),
    )


def job_to_proto(job: JobRecord) -> jobs_pb2.Job:
    return jobs_pb2.Job(
        job_id=job.job_id,
        kind=jobs_pb2.JobKind.Value(f"JOB_KIND_{job.kind}"),
        state=jobs_pb2.JobState.Value(f"JOB_STATE_{job.state}"),
        progress=job.progress,
        message=job.message,
        metrics=job.metrics,
        result=job.result,
        create_time=timestamp(job.create_time),
        update_time=timestamp(job.update_time),
    )


def base_model_to_proto(info: BaseModelInfo) -> registry_pb2.BaseModel:
    return registry_pb2.BaseModel(
        base_model_id=info.base_model_id,
        architecture=info.architecture,
        num_layers=info.num_layers,
        hidden_size=info.hidden_size,
        vocab_size=info.vocab_size,
        modules=[
            registry_pb2.ModuleShape(module=name, in_features=i, out_features=o)
            for name, (i, o) in info.modules.items()
        ],
        create_time=timestamp(info.create_time),
    )
