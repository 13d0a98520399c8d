"""``make demo``: the whole flow on the embedded default, in one command.

Starts the stack (registry, retriever + embedded Celery worker on a SQLite broker, executor on a
small random-weight Llama on the CPU), pushes one adapter per task of ``demo_tasks.json`` (random
weights, real sample inputs) and waits until each is READY, then runs a mixed-task session:
each prompt is retrieved, composed and generated with streamed output. The base model is random,
so the generated text is noise; what the demo shows is the system: the right adapters are found
for each prompt and mixed-task requests share the executor.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

from rich.console import Console

from loraserve.client import Client
from loraserve.devmodels import write_lora_adapter
from loraserve.stack import Stack, StackConfig


def load_tasks() -> list[dict]:
    return json.loads(resources.files("loraserve").joinpath("demo_tasks.json").read_text())["tasks"]


def _plan_str(plan) -> str:
    if not plan.adapters:
        return "base model"
    return " + ".join(f"{a.weight:.2f}·{a.adapter_id}" for a in plan.adapters)


def run_demo(data_dir: Path, console: Console, *, keep: bool = False) -> None:
    if data_dir.exists():
        shutil.rmtree(data_dir)
    stack = Stack(
        StackConfig(
            data_dir=data_dir, registry_port=50161, retriever_port=50162, executor_port=50163
        )
    )
    t0 = time.perf_counter()
    try:
        with console.status("starting the stack") as status:
            info = stack.start(on_status=status.update)
        console.print(
            f"[green]stack up[/green] in {time.perf_counter() - t0:.1f}s (base model {info.base_model}, CPU)"
        )
        tasks = load_tasks()
        with Client(info.registry, info.retriever, base_model=info.base_model) as client:
            _push_adapters(client, tasks, Path(info.model_dir), data_dir, info.base_model, console)
            _session(client, tasks, console)
    finally:
        with console.status("stopping the stack"):
            stack.stop()
        if not keep:
            shutil.rmtree(data_dir, ignore_errors=True)
    console.print(f"[green]demo finished[/green] in {time.perf_counter() - t0:.1f}s")


def _push_adapters(
    client: Client,
    tasks: list[dict],
    model_dir: Path,
    data_dir: Path,
    base_model: str,
    console: Console,
) -> None:
    console.rule("pushing adapters")
    pushed = []
    for i, task in enumerate(tasks):
        out = write_lora_adapter(
            data_dir / "adapters" / task["adapter_id"],
            model_dir,
            rank=8,
            alpha=16,
            seed=i,
            base_model_id=base_model,
        )
        adapter = client.push_adapter(
            out,
            task["adapter_id"],
            tags=task["tags"],
            domain=task["domain"],
            sample_inputs=task["samples"],
            progress=False,
        )
        pushed.append(adapter)
        console.print(
            f"  pushed {adapter.adapter_id}@{adapter.version} ({task['domain']}, {len(task['samples'])} sample inputs)"
        )
    with console.status("validating, embedding and indexing (Celery)"):
        for adapter in pushed:
            ready = client.wait_ready(adapter.adapter_id, adapter.version, timeout=180)
            console.print(f"  [green]READY[/green] {ready.adapter_id}@{ready.version}")


def _session(client: Client, tasks: list[dict], console: Console) -> None:
    console.rule("mixed-task session")
    prompts = [(t["adapter_id"], p) for t in tasks for p in t["held_out"]]
    random.Random(0).shuffle(prompts)
    hits = 0
    for i, (gold, prompt) in enumerate(prompts):
        plan = client.retrieve([prompt], top_k=2, strategy="mixture").plans[0]
        top = plan.candidates[0].adapter_id if plan.candidates else "-"
        hits += top == gold
        console.print(f"[bold]> {prompt}[/bold]")
        console.print(
            f"  plan: {_plan_str(plan.plan)}   (top-1 {'[green]✓[/green]' if top == gold else '[red]✗[/red] ' + gold})"
        )
        console.print("  ", end="")
        ttft = None
        for chunk in client.stream(prompt, plan=plan.plan, max_tokens=16, temperature=0.8, seed=i):
            ttft = ttft if ttft is not None else chunk.time_to_first_token_ms
            console.print(chunk.text, end="", markup=False, highlight=False)
            if chunk.finish_reason:
                console.print(
                    f"\n  [dim]{chunk.finish_reason}, {chunk.completion_tokens} tokens, "
                    f"time to first token {ttft or 0:.1f} ms[/dim]"
                )
    console.print(
        f"retrieval picked the task's own adapter first for {hits}/{len(prompts)} prompts"
    )
    _concurrent(client, [p for _, p in prompts], console)
    fusion = [(tasks[0]["adapter_id"], 0.5), (tasks[1]["adapter_id"], 0.5)]
    result = client.generate(
        "Translate and judge: 'the film was wonderful'",
        plan=fusion,
        strategy="fusion",
        max_tokens=8,
    )
    console.print(f"fusion plan {_plan_str(result.plan)} -> {result.completion_tokens} tokens")


def _concurrent(client: Client, prompts: list[str], console: Console) -> None:
    """All prompts at once: the executor batches the different plans into shared steps."""
    console.rule("the same prompts, all at once (one mixed-task batch)")
    start = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(
            pool.map(
                lambda p: client.generate(p, top_k=2, strategy="mixture", max_tokens=16), prompts
            )
        )
    elapsed = time.perf_counter() - start
    tokens = sum(r.completion_tokens for r in results)
    adapters = {a.adapter_id for r in results for a in r.plan.adapters}
    console.print(
        f"{len(results)} requests over {len(adapters)} adapters: {tokens} tokens in {elapsed:.2f}s "
        f"({tokens / elapsed:.0f} tokens/s on the CPU)"
    )
