"""TrainRetriever: contrastive fine-tuning of the retriever's embedding model (Celery, queue train).

The registry's JobService.TrainRetriever creates the job record and sends the task by name
``loraserve.train_retriever``; this module does the work and reports through
``registry_svc.jobs.update_job``.
"""

from __future__ import annotations

from typing import Any

from celery import shared_task

TASK_NAME = "loraserve.train_retriever"


@shared_task(name=TASK_NAME, bind=True, acks_late=True)
def train_retriever(self: Any, job_id: str, request: dict[str, Any]) -> str:
    """Fine-tune, re-embed the pool into a new collection, check held-out accuracy, switch."""
    raise NotImplementedError("train_retriever: being implemented")
