"""The ``loraserve`` command line: run the stack locally and talk to it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from loraserve.errors import LoraserveError

app = typer.Typer(
    help="loraserve: one base LLM, a large changing pool of LoRA adapters, chosen per prompt.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()

DataDir = typer.Option(
    Path(".loraserve"),
    "--data-dir",
    envvar="LORASERVE_DATA_DIR",
    help="Where the local stack keeps its files.",
)


def _client(data_dir: Path, base_model: str | None = None):
    """A client for the stack described by <data_dir>/stack.json, else the LORASERVE_* addresses."""
    from loraserve.client import Client
    from loraserve.stack import StackInfo

    info = StackInfo.load(data_dir)
    if info is None:
        return Client(base_model=base_model)
    return Client(info.registry, info.retriever, base_model=base_model or info.base_model)


def _fail(exc: Exception) -> None:
    console.print(f"[red]error:[/red] {exc}")
    raise typer.Exit(1)


@app.command()
def up(
    model: Path | None = typer.Option(
        None,
        "--model",
        help="A local transformers checkpoint for the executor; default: a small random-weight Llama (CPU).",
    ),
    data_dir: Path = DataDir,
    broker_url: str = typer.Option(
        "",
        envvar="LORASERVE_BROKER_URL",
        help="Celery broker (e.g. redis://127.0.0.1:6379/0); empty = embedded SQLite broker.",
    ),
    qdrant_url: str = typer.Option(
        "",
        envvar="LORASERVE_QDRANT_URL",
        help="Qdrant server; empty = local mode under the data dir.",
    ),
    host: str = typer.Option("127.0.0.1", help="Interface every service binds to."),
    registry_port: int = typer.Option(50151),
    retriever_port: int = typer.Option(50152),
    executor_port: int = typer.Option(50153),
) -> None:
    """Start the whole stack on this machine (registry, retriever, Celery worker, executor) until Ctrl-C."""
    from loraserve.stack import Stack, StackConfig

    stack = Stack(
        StackConfig(
            data_dir,
            model,
            broker_url,
            qdrant_url,
            host,
            registry_port,
            retriever_port,
            executor_port,
        )
    )
    try:
        with console.status("starting loraserve") as status:
            info = stack.start(on_status=lambda m: status.update(m))
        console.print(f"[green]loraserve is up[/green] base model [bold]{info.base_model}[/bold]")
        console.print(
            f"  registry  {info.registry}\n  retriever {info.retriever}\n  executor  {info.executor}"
        )
        console.print(f"  logs in {data_dir / 'logs'}; Ctrl-C stops every process")
        dead = stack.wait()
        console.print(
            f"[red]{dead} exited[/red]; stopping the stack (see {data_dir / 'logs' / (dead + '.log')})"
        )
        raise typer.Exit(1)
    except KeyboardInterrupt:
        console.print("stopping")
    except (RuntimeError, TimeoutError, FileNotFoundError) as exc:
        _fail(exc)
    finally:
        stack.stop()


@app.command()
def push(
    adapter_dir: Path = typer.Argument(
        ...,
        exists=True,
        file_okay=False,
        help="A PEFT adapter directory (adapter_config.json + adapter_model.safetensors).",
    ),
    adapter_id: str = typer.Option(None, "--id", help="Adapter name; default: the directory name."),
    base_model: str | None = typer.Option(None, help="Base model id; default: the local stack's."),
    version: int = typer.Option(0, help="Version number; 0 = next."),
    tag: list[str] = typer.Option([], "--tag", help="Tag (repeatable)."),
    domain: str = typer.Option("", help="Task domain, e.g. 'math'."),
    samples: Path | None = typer.Option(
        None, help="JSON list of sample inputs; default: sample_inputs.json in the adapter dir."
    ),
    wait: bool = typer.Option(True, help="Wait until the adapter is READY (or FAILED)."),
    data_dir: Path = DataDir,
) -> None:
    """Upload an adapter with a progress bar; the registry validates, embeds and indexes it."""
    sample_inputs = json.loads(samples.read_text()) if samples else None
    try:
        with _client(data_dir, base_model) as client:
            adapter = client.push_adapter(
                adapter_dir,
                adapter_id or adapter_dir.name.lower(),
                version=version,
                tags=tag,
                domain=domain,
                sample_inputs=sample_inputs,
                wait=wait,
            )
    except LoraserveError as exc:
        _fail(exc)
    from loraserve.requests import STATUS_NAMES

    console.print(f"{adapter.adapter_id}@{adapter.version}: {STATUS_NAMES[adapter.status]}")


@app.command()
def adapters(
    base_model: str | None = typer.Option(None, help="Only adapters of this base model."),
    tag: list[str] = typer.Option([], "--tag", help="Only adapters with every given tag."),
    domain: str = typer.Option("", help="Only adapters of this domain."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
    data_dir: Path = DataDir,
) -> None:
    """List the registered adapters (every page)."""
    from google.protobuf.json_format import MessageToDict

    from loraserve.requests import STATUS_NAMES

    table = Table("adapter", "version", "status", "rank", "domain", "tags", "size")
    try:
        with _client(data_dir) as client:
            for a in client.adapters(base_model=base_model or "", tags=tag, domain=domain):
                if as_json:
                    print(json.dumps(MessageToDict(a, preserving_proto_field_name=True)))
                    continue
                table.add_row(
                    a.adapter_id,
                    str(a.version),
                    STATUS_NAMES[a.status],
                    str(a.metadata.rank),
                    a.metadata.domain,
                    ",".join(a.metadata.tags),
                    f"{a.metadata.size_bytes / 1e6:.2f} MB",
                )
    except LoraserveError as exc:
        _fail(exc)
    if not as_json:
        console.print(table)


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="The prompt."),
    adapter: list[str] = typer.Option(
        [],
        "--adapter",
        help="NAME or NAME:WEIGHT (repeatable); default: retrieve adapters for the prompt.",
    ),
    strategy: str | None = typer.Option(
        None, help="selection | mixture | fusion (default: the retriever's)."
    ),
    top_k: int = typer.Option(0, help="Adapters to retrieve (0 = server default)."),
    max_tokens: int = typer.Option(32),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    seed: int | None = typer.Option(None),
    stream: bool = typer.Option(True, help="Print tokens as they are produced."),
    data_dir: Path = DataDir,
) -> None:
    """Retrieve adapters for the prompt, route it to an executor and generate."""
    plan = None
    if adapter:
        plan = [(a.split(":")[0], float(a.split(":")[1]) if ":" in a else 1.0) for a in adapter]
    try:
        with _client(data_dir) as client:
            kw = dict(
                plan=plan,
                strategy=strategy,
                top_k=top_k,
                max_tokens=max_tokens,
                temperature=temperature,
                seed=seed,
            )
            if not stream:
                result = client.generate(prompt, **kw)
                console.print(result.text)
                console.print(
                    f"[dim]{result.finish_reason}, {result.completion_tokens} tokens, plan {_plan_str(result.plan)}[/dim]"
                )
                return
            for chunk in client.stream(prompt, **kw):
                console.print(chunk.text, end="", markup=False, highlight=False)
                if chunk.finish_reason:
                    console.print(
                        f"\n[dim]{chunk.finish_reason}, {chunk.completion_tokens} tokens, plan {_plan_str(chunk.plan)}[/dim]"
                    )
    except LoraserveError as exc:
        _fail(exc)


def _plan_str(plan) -> str:
    if plan is None or not plan.adapters:
        return "base model"
    return " + ".join(f"{a.weight:.2f}·{a.adapter_id}" for a in plan.adapters)


@app.command()
def status(data_dir: Path = DataDir) -> None:
    """Health of every service, the executor's load and residency, and the adapter pool."""
    from loraserve.status import collect_status

    try:
        console.print(collect_status(data_dir))
    except LoraserveError as exc:
        _fail(exc)


@app.command()
def demo(
    data_dir: Path = typer.Option(
        Path(".loraserve/demo"), "--data-dir", help="Separate from `up`'s data dir."
    ),
    keep: bool = typer.Option(False, help="Keep the data dir afterwards."),
) -> None:
    """Start the stack, push the demo adapters, and run a mixed-task session with streamed output."""
    from loraserve.demo import run_demo

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        run_demo(data_dir, console, keep=keep)
    except (LoraserveError, RuntimeError, TimeoutError) as exc:
        _fail(exc)


if __name__ == "__main__":
    app()
