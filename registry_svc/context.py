"""What every RPC of the registry process needs: settings, metadata DB, blob store, Celery."""

from __future__ import annotations

from dataclasses import dataclass

from celery import Celery

from registry_svc.blobstore import BlobStore
from registry_svc.db import Database, open_database
from registry_svc.settings import RegistrySettings
from registry_svc.worker import make_celery


@dataclass(slots=True)
class RegistryContext:
    settings: RegistrySettings
    db: Database
    blobs: BlobStore
    celery: Celery

    @classmethod
    def create(cls, settings: RegistrySettings, celery: Celery | None = None) -> RegistryContext:
        """Open the DB and blob store; the Celery app only sends (it never opens Qdrant)."""
        return cls(
            settings=settings,
            db=open_database(settings.common),
            blobs=BlobStore(settings.resolved_blob_dir),
            celery=celery or make_celery(settings.common, settings=settings),
        )
