"""SQL engine for the registry's metadata, shared by the gRPC server and the Celery worker.

SQLite file under ``data_dir`` by default, ``common.database_url`` (e.g. PostgreSQL) when set.
Both the server and the worker (possibly another process) write, so SQLite runs in WAL mode
with a busy timeout, and write transactions start with ``BEGIN IMMEDIATE``: taking the write
lock up front means a reader never has to upgrade its lock, the case where SQLite gives up
with ``database is locked`` instead of waiting.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

from loraserve.settings import CommonSettings
from registry_svc.models import Base

SQLITE_BUSY_TIMEOUT_MS = 30_000


def database_url(common: CommonSettings) -> str:
    if common.database_url:
        return common.database_url
    path = Path(common.data_dir).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'registry.sqlite'}"


class Database:
    """An engine plus the two kinds of transaction the registry needs."""

    def __init__(self, url: str):
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self.is_postgres = url.startswith("postgresql")
        kwargs: dict = {"pool_pre_ping": True}
        if self.is_sqlite:
            kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
        self.engine: Engine = create_engine(url, **kwargs)
        if self.is_sqlite:
            _configure_sqlite(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        Base.metadata.create_all(self.engine)

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only session (one consistent snapshot in WAL mode)."""
        with self._sessions() as session, session.begin():
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A write transaction (``BEGIN IMMEDIATE`` on SQLite); commits on success."""
        with self._sessions() as session:
            options = {"sqlite_begin": "BEGIN IMMEDIATE"} if self.is_sqlite else None
            session.connection(execution_options=options)  # begins the transaction
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    def dispose(self) -> None:
        self.engine.dispose()


def _configure_sqlite(engine: Engine) -> None:
    """WAL, busy timeout, and our own BEGIN so that writers can ask for IMMEDIATE."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:  # noqa: ANN001 - DB-API connection
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:  # noqa: ANN001 - sqlalchemy Connection
        conn.exec_driver_sql(conn.get_execution_options().get("sqlite_begin", "BEGIN"))


_databases: dict[str, Database] = {}
_lock = threading.Lock()


def open_database(common: CommonSettings) -> Database:
    """The process-wide Database for these settings (tables created on first use)."""
    url = database_url(common)
    with _lock:
        db = _databases.get(url)
        if db is None:
            db = _databases[url] = Database(url)
        return db


def close_database(common: CommonSettings) -> None:
    with _lock:
        db = _databases.pop(database_url(common), None)
    if db is not None:
        db.dispose()


def ping(db: Database) -> None:
    with db.read() as session:
        session.execute(text("SELECT 1"))
