"""A worker SIGKILLed in the middle of an ingestion: the task is redelivered (Redis, acks_late)
to a new worker process and the adapter ends READY exactly once, with one set of points.

The workers are real ``celery -A registry_svc.worker worker`` processes; the registry server
runs in this process and watches their changes through the shared SQL change log.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from registry_helpers import SAMPLES, R, S, Stack, close_stack, make_stack, serve_registry

pytestmark = pytest.mark.slow


def spawn_worker(stack: Stack, name: str, log: Path, delay_s: float) -> subprocess.Popen:
    env = dict(os.environ)
    env.update(
        LORASERVE_DATA_DIR=str(stack.common.data_dir),
        LORASERVE_BROKER_URL=stack.common.broker_url,
        LORASERVE_REGISTRY_BROKER_KEY_PREFIX=stack.redis_prefix,
        LORASERVE_REGISTRY_MAX_RANK=str(stack.settings.max_rank),
        # Redeliver an unacknowledged task 2 s after its worker vanished (default: 1 h).
        LORASERVE_REGISTRY_VISIBILITY_TIMEOUT_S="2",
        LORASERVE_REGISTRY_TEST_INGEST_DELAY_S=str(delay_s),
    )
    cmd = [sys.executable, "-m", "celery", "-A", "registry_svc.worker", "worker",
           "-Q", "ingest", "-P", "threads", "-c", "1", "-n", f"{name}@%h", "-l", "INFO",
           "--without-heartbeat", "--without-mingle", "--without-gossip"]  # fmt: skip
    with log.open("ab") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


async def test_sigkill_mid_task_then_restart_ends_ready_once(
    tmp_path, redis_url, tiny_model_dir, adapter_factory
):
    stack = make_stack(tmp_path / "data", redis_url)
    log = tmp_path / "workers.log"
    procs: list[subprocess.Popen] = []
    try:
        async with serve_registry(stack, tiny_model_dir) as client:
            first = spawn_worker(stack, "doomed", log, delay_s=60)
            procs.append(first)
            await client.push("survivor", adapter_factory("survivor", rank=4))
            # The first worker took the task: it sleeps inside VALIDATING.
            await client.wait("survivor", timeout=90, statuses={S.ADAPTER_STATUS_VALIDATING})
            stop(first, signal.SIGKILL)
            assert first.returncode == -signal.SIGKILL

            watch = client.registry.WatchAdapters(
                R.WatchAdaptersRequest(
                    filter=R.AdapterFilter(adapter_id_prefix="survivor"), send_initial_state=True
                )
            )
            snapshot = await watch.read()
            assert snapshot.adapter.status == S.ADAPTER_STATUS_VALIDATING
            assert (await watch.read()).type == R.ADAPTER_EVENT_TYPE_SNAPSHOT_END

            procs.append(spawn_worker(stack, "heir", log, delay_s=0))
            ready = await client.wait("survivor", timeout=120)
            assert ready.status == S.ADAPTER_STATUS_READY, ready.failure_reason
            seen = []
            while not seen or seen[-1] != S.ADAPTER_STATUS_READY:  # written by another process
                seen.append((await asyncio.wait_for(watch.read(), 10)).adapter.status)
            watch.cancel()
            assert seen[-1] == S.ADAPTER_STATUS_READY

            listed = await client.registry.ListAdapters(
                R.ListAdaptersRequest(filter=R.AdapterFilter(include_deleted=True))
            )
            assert [(a.adapter_id, a.version, a.status) for a in listed.adapters] == [
                ("survivor", 1, S.ADAPTER_STATUS_READY)
            ]
        for proc in procs:
            stop(proc)
        assert stack.points_of("survivor") == 1 + len(SAMPLES)  # this process may open Qdrant now
    except BaseException:
        print(log.read_text()[-4000:] if log.exists() else "(no worker log)")
        raise
    finally:
        for proc in procs:
            stop(proc, signal.SIGKILL)
        close_stack(stack)
