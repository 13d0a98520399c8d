"""Process entry: ``python -m retriever_svc``.

In the one-machine default (no ``LORASERVE_QDRANT_URL``) Qdrant runs in local mode, which allows
one process per path: this process owns it, so it also hosts the Celery worker (queues
``ingest`` and ``train``) that writes to it, as threads (``registry_svc.worker``).
"""

from __future__ import annotations

import asyncio
import logging

from loraserve.logging import configure_logging
from loraserve.server import GrpcServer, run_until_signal
from retriever_svc.server import build_server
from retriever_svc.settings import RetrieverSettings

log = logging.getLogger("loraserve.retriever")


async def serve(settings: RetrieverSettings) -> None:
    server: GrpcServer = build_server(settings)
    worker = None
    if settings.embedded_worker and not settings.common.qdrant_url:
        from registry_svc.worker import make_celery, start_worker_thread

        app = make_celery(settings.common, key_prefix="")
        worker = await asyncio.to_thread(
            start_worker_thread, app, queues=("ingest", "train"), concurrency=1
        )
        log.info("embedded celery worker started", extra={"hostname": worker.hostname})
    try:
        await run_until_signal([server])
    finally:
        if worker is not None:
            await asyncio.to_thread(worker.stop)


def main() -> None:
    settings = RetrieverSettings()
    configure_logging(settings.common.log_level, settings.common.log_json)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
