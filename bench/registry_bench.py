"""Registry benchmarks: upload throughput over loopback, ingestion latency push → READY.

Real processes, as deployed on one machine: the registry server (``python -m registry_svc``)
and a Celery worker (``celery -A registry_svc.worker worker``) are subprocesses; this script is
the client (sync gRPC stub, ``loraserve.upload.iter_push_requests``). Prints one JSON line per
case; never asserts on time.

    .venv/bin/python bench/registry_bench.py [--runs 10] [--broker embedded|redis]

Adapters are written directly as PEFT files: "40mb" is rank 8 on all seven projections of
Llama-2-7B's shapes in fp16 (40 MB of weights), "small" is rank 8 on q/v of a tiny Llama.
Upload throughput is measured with no worker running (ingestion would share the two cores);
ingestion latency is measured from the PushAdapter response to READY, excluding the upload,
both as the client sees it (GetAdapter polled every 10 ms) and by the server's clocks
(READY update_time - create_time).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import torch
from safetensors.torch import save_file

from loraserve.api.v1 import common_pb2, registry_pb2, registry_pb2_grpc
from loraserve.upload import iter_push_requests

R = registry_pb2
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA2_7B = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=4096,
                 intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                 num_hidden_layers=32, vocab_size=32000)  # fmt: skip
TINY = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, num_hidden_layers=2, vocab_size=512)  # fmt: skip
SAMPLES_PER_ADAPTER = 20


def samples(adapter_id: str) -> list[str]:
    """Distinct prompts per adapter, so the embedder's cache never answers for the model."""
    return [
        f"Translate to French ({adapter_id}, {i}): the weather is nice today."
        for i in range(SAMPLES_PER_ADAPTER)
    ]


def dims(cfg: dict) -> dict[str, tuple[int, int]]:
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}  # fmt: skip


def write_adapter(out: Path, cfg: dict, rank: int, modules: list[str], base_id: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for m in modules:
            parent = "self_attn" if m in PROJ[:4] else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{parent}.{m}"
            d_in, d_out = dims(cfg)[m]
            tensors[f"{prefix}.lora_A.weight"] = (
                torch.randn(rank, d_in, generator=gen) * 0.01
            ).half()
            tensors[f"{prefix}.lora_B.weight"] = (
                torch.randn(d_out, rank, generator=gen) * 0.01
            ).half()
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": modules,
              "bias": "none", "base_model_name_or_path": base_id, "task_type": "CAUSAL_LM"}  # fmt: skip
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, *args], env=env, stdout=out, stderr=out)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def push(stub, adapter_id: str, adapter_dir: Path, chunk: int) -> R.PushAdapterResponse:
    header = R.PushAdapterHeader(adapter_id=adapter_id, sample_inputs=samples(adapter_id))
    return stub.PushAdapter(iter_push_requests(adapter_dir, header, chunk_size=chunk))


def wait_ready(stub, adapter_id: str, version: int, timeout: float = 120) -> common_pb2.Adapter:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        a = stub.GetAdapter(R.GetAdapterRequest(adapter_id=adapter_id, version=version)).adapter
        if a.status == common_pb2.ADAPTER_STATUS_READY:
            return a
        if a.status == common_pb2.ADAPTER_STATUS_FAILED:
            raise RuntimeError(f"{adapter_id} FAILED: {a.failure_reason}")
        time.sleep(0.01)
    raise TimeoutError(adapter_id)


def watch_phases(stub, prefix: str) -> dict[str, dict[int, float]]:
    """Follow WatchAdapters in a thread: adapter id -> {status: update_time}."""
    seen: dict[str, dict[int, float]] = {}
    stream = stub.WatchAdapters(
        R.WatchAdaptersRequest(filter=R.AdapterFilter(adapter_id_prefix=prefix))
    )

    def follow() -> None:
        try:
            for event in stream:
                a = event.adapter
                seen.setdefault(a.adapter_id, {})[a.status] = a.update_time.ToNanoseconds() / 1e9
        except grpc.RpcError:
            pass  # cancelled at exit

    threading.Thread(target=follow, daemon=True).start()
    time.sleep(0.5)  # the stream is established before the first push
    return seen


def phase_medians(seen: dict[str, dict[int, float]], prefix: str) -> dict[str, float]:
    """Median seconds spent queued (PENDING), validating, embedding + writing vectors."""
    S = common_pb2
    steps = {"queued_s_p50": (S.ADAPTER_STATUS_PENDING, S.ADAPTER_STATUS_VALIDATING),
             "validate_s_p50": (S.ADAPTER_STATUS_VALIDATING, S.ADAPTER_STATUS_EMBEDDING),
             "embed_index_s_p50": (S.ADAPTER_STATUS_EMBEDDING, S.ADAPTER_STATUS_READY)}  # fmt: skip
    out = {}
    for key, (a, b) in steps.items():
        spans = [
            t[b] - t[a] for name, t in seen.items() if name.startswith(prefix) and a in t and b in t
        ]
        out[key] = round(statistics.median(spans), 3) if spans else None
    return out


def pct(values: list[float], q: float) -> float:
    return (
        statistics.quantiles(values, n=100, method="inclusive")[q - 1]
        if len(values) > 1
        else values[0]
    )


def emit(**row) -> None:
    row.update(device=f"CPU, {os.cpu_count()} cores", python=platform.python_version(),
               date=time.strftime("%Y-%m-%d"))  # fmt: skip
    print(json.dumps(row), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--broker", choices=["embedded", "redis"], default="embedded")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/12")
    args = p.parse_args()

    root = Path(tempfile.mkdtemp(prefix="registry-bench-"))
    big = write_adapter(root / "big", LLAMA2_7B, 8, PROJ, "llama-2-7b")
    small = write_adapter(root / "small", TINY, 8, ["q_proj", "v_proj"], "tiny-llama")
    big_bytes = sum(f.stat().st_size for f in big.iterdir())
    port = free_port()
    env = dict(os.environ, LORASERVE_DATA_DIR=str(root / "data"), LORASERVE_REGISTRY_PORT=str(port),
               LORASERVE_LOG_LEVEL="WARNING", LORASERVE_REGISTRY_MAX_RANK="64",
               LORASERVE_REGISTRY_BROKER_KEY_PREFIX=f"registry-bench-{port}:")  # fmt: skip
    if args.broker == "redis":
        env["LORASERVE_BROKER_URL"] = args.redis_url
    log = root / "processes.log"
    server = spawn(["-m", "registry_svc"], env, log)
    worker = None
    try:
        channel = grpc.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 8 << 20)]
        )
        grpc.channel_ready_future(channel).result(timeout=60)
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        for base_id, cfg in (("llama-2-7b", LLAMA2_7B), ("tiny-llama", TINY)):
            stub.RegisterBaseModel(R.RegisterBaseModelRequest(base_model_id=base_id,
                                                              config_json=json.dumps(cfg)))  # fmt: skip

        # 1. Upload throughput (no worker: the tasks queue up and are purged below).
        for chunk in (1 << 20, 4 << 20):
            times = []
            for i in range(args.runs + 1):
                t0 = time.perf_counter()
                push(stub, f"up-{chunk >> 20}m-{i}", big, chunk)
                if i:  # the first run warms the channel and the server's caches
                    times.append(time.perf_counter() - t0)
            mbps = [big_bytes / t / 1e6 for t in times]
            emit(bench="registry_upload", adapter_mb=round(big_bytes / 1e6, 1),
                 chunk_kib=chunk >> 10, runs=len(times), broker=args.broker,
                 mb_per_s_p50=round(statistics.median(mbps), 1), mb_per_s_min=round(min(mbps), 1),
                 push_s_p50=round(statistics.median(times), 3))  # fmt: skip
        purge = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "registry_svc.worker",
            "purge",
            "-f",
            "-Q",
            "ingest",
        ]
        subprocess.run(purge, env=env, check=True, capture_output=True)

        # 2. Ingestion latency, PushAdapter response -> READY.
        worker = spawn(["-m", "celery", "-A", "registry_svc.worker", "worker", "-Q", "ingest",
                        "-P", "threads", "-c", "1", "-l", "WARNING", "--without-heartbeat",
                        "--without-mingle", "--without-gossip"], env, log)  # fmt: skip
        warm = push(stub, "warmup", small, 1 << 20)  # waits for the worker and its model
        wait_ready(stub, "warmup", warm.adapter.version, timeout=300)
        phases = watch_phases(stub, "ing-")
        for name, adapter_dir in (("small", small), ("40mb", big)):
            client_s, server_s = [], []
            for i in range(args.runs):
                resp = push(stub, f"ing-{name}-{i}", adapter_dir, 1 << 20)
                t0 = time.perf_counter()
                ready = wait_ready(stub, f"ing-{name}-{i}", resp.adapter.version)
                client_s.append(time.perf_counter() - t0)
                server_s.append(
                    (ready.update_time.ToNanoseconds() - ready.create_time.ToNanoseconds()) / 1e9
                )
            emit(bench="registry_ingest_latency", adapter=name, runs=args.runs,
                 broker=args.broker, samples_per_adapter=SAMPLES_PER_ADAPTER,
                 client_s_p50=round(statistics.median(client_s), 3),
                 client_s_p90=round(pct(client_s, 90), 3), client_s_max=round(max(client_s), 3),
                 server_s_p50=round(statistics.median(server_s), 3),
                 **phase_medians(phases, f"ing-{name}-"))  # fmt: skip
    except BaseException:
        print(log.read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        if worker is not None:
            stop(worker)
        stop(server)
        shutil.rmtree(root, ignore_errors=True)
        if args.broker == "redis":
            import redis

            r = redis.Redis.from_url(args.redis_url)
            keys = list(r.scan_iter(match=f"registry-bench-{port}:*"))
            if keys:
                r.delete(*keys)


if __name__ == "__main__":
    main()
