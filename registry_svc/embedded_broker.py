"""kombu's SQLAlchemy transport, tuned for the embedded (no-server) broker on SQLite.

Two changes: the polling period comes from the ``polling_interval`` transport option (kombu's
stock transport would hand that option to ``create_engine`` and fail), and SQLite waits on a
lock instead of failing at once. Selected by :func:`registry_svc.worker.make_celery` when the
broker URL is ``sqla+sqlite://...`` (``CommonSettings.resolved_broker_url`` without Redis).
"""

from __future__ import annotations

from kombu.transport import sqlalchemy as kombu_sqla
from sqlalchemy import create_engine

TRANSPORT_PATH = "registry_svc.embedded_broker:Transport"
_NOT_ENGINE_OPTIONS = {
    "queue_tablename",
    "message_tablename",
    "callback",
    "errback",
    "max_retries",
    "interval_start",
    "interval_step",
    "interval_max",
    "retry_errors",
    "polling_interval",
}


class Channel(kombu_sqla.Channel):
    def _engine_from_config(self):  # noqa: ANN202 - kombu's signature
        conninfo = self.connection.client
        options = {
            k: v for k, v in conninfo.transport_options.items() if k not in _NOT_ENGINE_OPTIONS
        }
        if conninfo.hostname.startswith("sqlite"):
            options.setdefault("connect_args", {"timeout": 30})
        return create_engine(conninfo.hostname, **options)


class Transport(kombu_sqla.Transport):
    Channel = Channel
