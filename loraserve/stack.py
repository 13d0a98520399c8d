"""Start the whole stack on this machine as processes (``loraserve up`` / ``loraserve demo``).

Processes: registry (RegistryService + JobService), retriever (RetrieverService), executor
(ExecutorService), and the Celery worker. Qdrant local mode allows one process per path, so
when no Qdrant URL is set the ingest/train worker runs as threads inside the retriever process,
which owns the local Qdrant; with a Qdrant URL it is a process of its own. Without a broker URL
Celery uses an embedded SQLite broker, so nothing needs a server.

Each process logs to ``<data_dir>/logs/<name>.log``; ``<data_dir>/stack.json`` records the
addresses, PIDs and base model for the other CLI commands. Stopping sends SIGTERM to each PID
(then SIGKILL after a grace period).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraserve.settings import (
    DEFAULT_EXECUTOR_PORT,
    DEFAULT_REGISTRY_PORT,
    DEFAULT_RETRIEVER_PORT,
)

TINY_MODEL_ID = "tiny-llama"


@dataclass(slots=True)
class StackConfig:
    data_dir: Path = Path(".loraserve")
    model_dir: Path | None = None  # None = tiny random Llama built under data_dir
    broker_url: str = ""
    qdrant_url: str = ""
    host: str = "127.0.0.1"
    registry_port: int = DEFAULT_REGISTRY_PORT
    retriever_port: int = DEFAULT_RETRIEVER_PORT
    executor_port: int = DEFAULT_EXECUTOR_PORT
    log_level: str = "INFO"


@dataclass(slots=True)
class StackInfo:
    base_model: str
    model_dir: str
    registry: str
    retriever: str
    executor: str
    pids: dict[str, int] = field(default_factory=dict)

    def save(self, data_dir: Path) -> None:
        (data_dir / "stack.json").write_text(json.dumps(asdict(self), indent=2))

    @staticmethod
    def load(data_dir: Path) -> StackInfo | None:
        path = data_dir / "stack.json"
        return StackInfo(**json.loads(path.read_text())) if path.exists() else None


def ensure_model(config: StackConfig) -> tuple[str, Path]:
    """(base model id, checkpoint dir): the given --model, or the tiny random Llama."""
    if config.model_dir is not None:
        path = Path(config.model_dir).resolve()
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} is not a transformers checkpoint (no config.json)")
        return path.name, path
    path = (config.data_dir / "models" / TINY_MODEL_ID).resolve()
    if not (path / "config.json").exists():
        from loraserve.devmodels import build_tiny_model

        build_tiny_model(path)
    return TINY_MODEL_ID, path


class Stack:
    """The processes of one local deployment."""

    def __init__(self, config: StackConfig):
        self.config = config
        self.procs: dict[str, subprocess.Popen] = {}
        self.info: StackInfo | None = None

    def _address(self, port: int) -> str:
        return f"{self.config.host}:{port}"

    def _env(self, model_dir: Path) -> dict[str, str]:
        c = self.config
        addr = self._address
        env = dict(os.environ)
        env.update(
            LORASERVE_DATA_DIR=str(c.data_dir.resolve()),
            LORASERVE_BROKER_URL=c.broker_url,
            LORASERVE_QDRANT_URL=c.qdrant_url,
            LORASERVE_LOG_LEVEL=c.log_level,
            LORASERVE_REGISTRY_ADDRESS=addr(c.registry_port),
            LORASERVE_RETRIEVER_ADDRESS=addr(c.retriever_port),
            LORASERVE_EXECUTOR_ADDRESSES=json.dumps([addr(c.executor_port)]),
            LORASERVE_REGISTRY_HOST=c.host,
            LORASERVE_REGISTRY_PORT=str(c.registry_port),
            LORASERVE_RETRIEVER_HOST=c.host,
            LORASERVE_RETRIEVER_PORT=str(c.retriever_port),
            LORASERVE_EXECUTOR_HOST=c.host,
            LORASERVE_EXECUTOR_PORT=str(c.executor_port),
            LORASERVE_EXECUTOR_MODEL_DIR=str(model_dir),
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            TOKENIZERS_PARALLELISM="false",
        )
        return env

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> None:
        logs = self.config.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        out = open(logs / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child process
        self.procs[name] = subprocess.Popen(
            [sys.executable, *args], env=env, stdout=out, stderr=subprocess.STDOUT
        )

    def start(self, timeout: float = 180.0, on_status=lambda msg: None) -> StackInfo:
        c = self.config
        c.data_dir.mkdir(parents=True, exist_ok=True)
        on_status("preparing the base model")
        base_model, model_dir = ensure_model(c)
        env = self._env(model_dir)
        self._spawn("registry", ["-m", "registry_svc"], env)
        self._spawn("retriever", ["-m", "retriever_svc"], env)
        if c.qdrant_url:
            self._spawn(
                "worker",
                [
                    "-m",
                    "celery",
                    "-A",
                    "registry_svc.worker",
                    "worker",
                    "-Q",
                    "ingest,train",
                    "-c",
                    "1",
                    "--pool",
                    "threads",
                    "--loglevel",
                    c.log_level,
                ],
                env,
            )
        self._spawn("executor", ["-m", "executor_svc"], env)
        a = self._address
        self.info = StackInfo(
            base_model, str(model_dir), a(c.registry_port), a(c.retriever_port), a(c.executor_port)
        )
        for name, address in (
            ("registry", self.info.registry),
            ("retriever", self.info.retriever),
            ("executor", self.info.executor),
        ):
            on_status(f"waiting for {name} at {address}")
            self._wait_serving(name, address, timeout)
        self.info.pids = {name: p.pid for name, p in self.procs.items()}
        self.info.save(c.data_dir)
        self._register_base_model(base_model, model_dir)
        return self.info

    def _wait_serving(self, name: str, address: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                proc = self.procs[name]
                if proc.poll() is not None:
                    log = self.config.data_dir / "logs" / f"{name}.log"
                    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
                    raise RuntimeError(
                        f"{name} exited with code {proc.returncode}; log tail:\n{tail}"
                    )
                try:
                    if (
                        stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                        == health_pb2.HealthCheckResponse.SERVING
                    ):
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise TimeoutError(f"{name} at {address} not SERVING after {timeout:.0f}s")

    def _register_base_model(self, base_model: str, model_dir: Path) -> None:
        from loraserve.client import Client

        assert self.info is not None
        with Client(self.info.registry, self.info.retriever, base_model=base_model) as client:
            client.register_base_model(base_model, model_dir)

    def stop(self, grace: float = 10.0) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
        stack_file = self.config.data_dir / "stack.json"
        if stack_file.exists():
            stack_file.unlink()

    def wait(self) -> str:
        """Block until a process exits; returns its name."""
        while True:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    return name
            time.sleep(0.5)
