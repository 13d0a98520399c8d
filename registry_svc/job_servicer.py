"""JobService: ingestion re-runs, retriever training, job status (status lives in SQL)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

from google.protobuf.json_format import MessageToDict

from loraserve.api.v1 import jobs_pb2, jobs_pb2_grpc
from loraserve.errors import FailedPrecondition, InvalidArgument, NotFound
from registry_svc import jobs
from registry_svc.context import RegistryContext
from registry_svc.convert import job_to_proto
from registry_svc.lifecycle import restart_ingest
from registry_svc.names import check_adapter_id, check_base_model_id
from registry_svc.worker import TASK_TRAIN_RETRIEVER, TRAIN_QUEUE

J = jobs_pb2


class JobServicer(jobs_pb2_grpc.JobServiceServicer):
    def __init__(self, ctx: RegistryContext):
        self.ctx = ctx

    async def _get(self, job_id: str) -> jobs.JobRecord:
        if not job_id:
            raise InvalidArgument.field("job_id", "is required")
        job = await asyncio.to_thread(jobs.get_job, self.ctx.db, job_id)
        if job is None:
            raise NotFound(f"job {job_id!r} not found", resource_type="job", resource_name=job_id)
        return job

    async def StartIngest(self, request, context) -> J.StartIngestResponse:
        check_adapter_id(request.adapter.adapter_id, "adapter.adapter_id")
        job = await asyncio.to_thread(
            restart_ingest, self.ctx, request.adapter.adapter_id, request.adapter.version
        )
        return J.StartIngestResponse(job=job_to_proto(job))

    async def TrainRetriever(self, request, context) -> J.TrainRetrieverResponse:
        """Create the job and send ``loraserve.train_retriever`` (retriever_svc.training)."""
        check_base_model_id(request.base_model)
        job_id = f"train-retriever-{uuid.uuid4().hex[:16]}"
        job = await asyncio.to_thread(
            jobs.create_job, self.ctx.db, job_id, jobs.KIND_TRAIN_RETRIEVER
        )
        payload = MessageToDict(request, preserving_proto_field_name=True)
        await asyncio.to_thread(
            self.ctx.celery.send_task,
            TASK_TRAIN_RETRIEVER,
            kwargs={"job_id": job_id, "request": payload},
            queue=TRAIN_QUEUE,
            task_id=job_id,
        )
        return J.TrainRetrieverResponse(job=job_to_proto(job))

    async def TrainGate(self, request, context) -> J.TrainGateResponse:
        raise FailedPrecondition("gate training is not available yet")

    async def GetJob(self, request, context) -> J.GetJobResponse:
        return J.GetJobResponse(job=job_to_proto(await self._get(request.job_id)))

    async def WatchJob(self, request, context) -> AsyncIterator[J.WatchJobResponse]:
        """Every change of the job (polled), ending with its terminal state."""
        job = await self._get(request.job_id)
        yield J.WatchJobResponse(job=job_to_proto(job))
        while not job.done:
            await asyncio.sleep(self.ctx.settings.watch_poll_interval_s)
            latest = await self._get(request.job_id)
            if latest.revision != job.revision:
                job = latest
                yield J.WatchJobResponse(job=job_to_proto(job))
