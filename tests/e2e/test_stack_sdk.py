"""`loraserve up`'s process stack driven through the SDK and the CLI, end to end.

Real processes (registry, retriever with the embedded Celery worker on the SQLite broker,
executor on the tiny model), real gRPC, real Qdrant local mode. Everything is stopped by PID.
"""

from __future__ import annotations

import asyncio
import os
import socket

import pytest
from typer.testing import CliRunner

from loraserve import AsyncClient, Client
from loraserve.cli import app
from loraserve.devmodels import write_lora_adapter
from loraserve.errors import InvalidArgument, NotFound
from loraserve.stack import Stack, StackConfig

SAMPLES = {
    "math": [
        "What is 17 times 4?",
        "Anna has 12 apples and eats 5. How many are left?",
        "Compute 144 / 12.",
    ],
    "french": [
        "Translate to French: the cat sleeps.",
        "Say in French: good morning.",
        "French for: where is the station?",
    ],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("stack")
    config = StackConfig(
        data_dir=data_dir,
        registry_port=_free_port(),
        retriever_port=_free_port(),
        executor_port=_free_port(),
        log_level="WARNING",
    )
    stack = Stack(config)
    try:
        info = stack.start(timeout=240)
        yield stack, info
    finally:
        pids = [p.pid for p in stack.procs.values()]
        stack.stop()
        for pid in pids:  # every process is gone
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)


def test_push_retrieve_route_generate_stream(stack, tmp_path):
    _, info = stack
    with Client(info.registry, info.retriever, base_model=info.base_model, timeout=120) as client:
        for i, (name, samples) in enumerate(SAMPLES.items()):
            path = write_lora_adapter(
                tmp_path / name, info.model_dir, rank=4, seed=i, base_model_id=info.base_model
            )
            adapter = client.push_adapter(
                path, name, domain=name, sample_inputs=samples, progress=False, wait=True
            )
            assert adapter.status == 4  # READY
        assert {a.adapter_id for a in client.adapters()} == set(SAMPLES)

        result = client.generate(
            "What is 9 plus 14?", max_tokens=6
        )  # retrieve -> route -> generate
        assert [a.adapter_id for a in result.plan.adapters][0] == "math"
        assert result.completion_tokens == 6 and result.finish_reason == "length"
        assert result.replica == info.executor

        chunks = list(
            client.stream(
                "Translate to French: thank you", max_tokens=5, strategy="mixture", top_k=2
            )
        )
        assert chunks[-1].finish_reason == "length"
        assert sum(len(c.token_ids) for c in chunks) == 5
        assert chunks[0].plan.adapters[0].adapter_id == "french"

        explicit = client.generate(
            "anything", plan=[("math", 0.5), ("french", 0.5)], max_tokens=3, seed=3, temperature=0.7
        )
        assert explicit.completion_tokens == 3

        with pytest.raises(NotFound):
            client.generate("x", plan=[("no-such-adapter", 1.0)], max_tokens=2)
        with pytest.raises(InvalidArgument) as bad:
            client.generate("x", plan=[("math", 1.0)], max_tokens=2, temperature=-1.0)
        assert bad.value.violations


def test_async_client_and_cli_against_the_stack(stack):
    stack_obj, info = stack

    async def run() -> list[str]:
        async with AsyncClient(
            info.registry, info.retriever, base_model=info.base_model, timeout=120
        ) as client:
            results = await asyncio.gather(
                *(
                    client.generate(p, max_tokens=4)
                    for p in ["What is 3 times 3?", "Say in French: hello", "Compute 10 / 2."]
                )
            )
            assert all(r.completion_tokens == 4 for r in results)
            streamed = [c async for c in client.stream("What is 2 plus 2?", max_tokens=3)]
            assert streamed[-1].finish_reason == "length"
            return [r.plan.adapters[0].adapter_id for r in results]

    assert asyncio.run(run()) == ["math", "french", "math"]

    runner = CliRunner()
    data_dir = str(stack_obj.config.data_dir)
    listed = runner.invoke(app, ["adapters", "--data-dir", data_dir, "--json"])
    assert listed.exit_code == 0 and '"adapter_id": "math"' in listed.output
    generated = runner.invoke(
        app, ["generate", "What is 6 times 7?", "--max-tokens", "3", "--data-dir", data_dir]
    )
    assert generated.exit_code == 0 and "math" in generated.output
    status = runner.invoke(app, ["status", "--data-dir", data_dir], env={"COLUMNS": "200"})
    assert status.exit_code == 0 and status.output.count("SERVING") == 3
