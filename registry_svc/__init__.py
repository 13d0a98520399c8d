"""registry_svc: owns adapters (upload, validation, blob store, metadata, embeddings, download).

Where things are:

- ``server.py`` / ``servicer.py`` / ``job_servicer.py`` — the gRPC process (RegistryService,
  JobService); ``context.py`` bundles what handlers need; ``maintenance.py`` its upkeep loop.
- ``push.py`` → ``upload.py`` (stream → spools) → ``validation.py`` (``peft_config.py``,
  ``safetensors_header.py``, ``basemodels.py``) → ``blobstore.py`` → ``store.py`` →
  ``ingest_dispatch.py`` (job + Celery task).
- ``worker.py`` (Celery app, in-process worker) → ``tasks.py`` → ``ingest.py`` (validate, embed,
  ``vector_index.py`` upsert, READY). Only tasks open Qdrant; the gRPC process never does.
- ``db.py`` / ``models.py`` (SQL), ``jobs.py`` (job store API for any process), ``watch.py``
  (change-log polling), ``download.py``, ``lifecycle.py`` (delete, re-ingest, GC),
  ``paging.py``, ``names.py``, ``convert.py`` (rows → messages).
"""
