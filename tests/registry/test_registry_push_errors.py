"""Bad uploads: each gets its status code and message, and leaves no record, blob, spool or point.

Every case runs through the real stub against the real server (with its Celery worker up).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
import torch
from registry_helpers import BASE, SAMPLES, R
from safetensors.torch import load_file, save_file

from loraserve.api.v1 import common_pb2
from loraserve.devmodels import write_lora_adapter
from loraserve.errors import parse_rpc_error
from loraserve.upload import iter_push_requests

CFG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
INVALID = grpc.StatusCode.INVALID_ARGUMENT
Requests = list[R.PushAdapterRequest]


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[SimpleNamespace], Requests]
    code: grpc.StatusCode
    message: str  # a substring of the status message
    cancel_after: int = 0  # client cancels after sending this many messages


def push(adapter_dir: Path, adapter_id: str = "bad-adapter", **header) -> Requests:
    header.setdefault("base_model", BASE)
    header.setdefault("sample_inputs", SAMPLES)
    h = R.PushAdapterHeader(adapter_id=adapter_id, **header)
    return list(iter_push_requests(adapter_dir, h, chunk_size=4096))


def raw(files: dict[str, bytes], adapter_id: str = "bad-adapter", declare: bool = True) -> Requests:
    """A hand-made stream: header (declaring the files, or not) and one chunk per file."""
    infos = []
    for name, data in files.items():
        info = common_pb2.FileInfo(name=name, size_bytes=len(data))
        infos.append(info)
    header = R.PushAdapterHeader(
        adapter_id=adapter_id,
        base_model=BASE,
        sample_inputs=SAMPLES,
        files=infos if declare else [],
    )
    out = [R.PushAdapterRequest(header=header)]
    for name, data in files.items():
        out.append(R.PushAdapterRequest(chunk=common_pb2.FileChunk(file_name=name, data=data)))
    return out


def copy_good(env: SimpleNamespace) -> Path:
    out = env.tmp / "case"
    shutil.copytree(env.good, out)
    return out


def with_config(env: SimpleNamespace, **changes) -> Path:
    """The good adapter with adapter_config.json edited (None deletes a key)."""
    out = copy_good(env)
    cfg = json.loads((out / CFG).read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (out / CFG).write_text(json.dumps(cfg))
    return out


def with_tensors(env: SimpleNamespace, edit: Callable[[dict], None]) -> Path:
    out = copy_good(env)
    tensors = load_file(str(out / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(out / WEIGHTS))
    return out


def files_of(adapter_dir: Path) -> dict[str, bytes]:
    return {CFG: (adapter_dir / CFG).read_bytes(), WEIGHTS: (adapter_dir / WEIGHTS).read_bytes()}


def set_nan(tensors: dict) -> None:
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")


def pickle_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    return buf.getvalue()


def truncated(env: SimpleNamespace) -> Requests:
    files = files_of(env.good)
    files[WEIGHTS] = files[WEIGHTS][:-100]
    return raw(files)


def cut_off(env: SimpleNamespace) -> Requests:
    """Declares full sizes, then the stream ends halfway through the weights."""
    reqs = push(env.good)
    return reqs[: len(reqs) // 2]


def wrong_shapes(env: SimpleNamespace) -> Requests:
    other = env.model_factory("llama", hidden_size=96, intermediate_size=160)
    return push(write_lora_adapter(env.tmp / "other", other, rank=4, base_model_id=BASE))


def with_key_renamed(old: str, new: str) -> Callable[[dict], None]:
    def edit(tensors: dict) -> None:
        for key in [k for k in tensors if old in k]:
            tensors[key.replace(old, new)] = tensors.pop(key)

    return edit


def with_header(**header) -> Callable[[SimpleNamespace], Requests]:
    return lambda env: push(env.good, **header)


def offset_gap(env: SimpleNamespace) -> Requests:
    reqs = push(env.good)
    reqs[3].chunk.offset += 10
    return reqs


def bad_sha(env: SimpleNamespace) -> Requests:
    reqs = push(env.good)
    reqs[0].header.files[1].sha256 = "0" * 64
    return reqs


ERROR_CASES = [
    # Pickle is never accepted, under any name.
    Case(
        "pickle-bin-declared",
        lambda e: raw({CFG: files_of(e.good)[CFG], "adapter_model.bin": pickle_bytes()}),
        INVALID,
        "pickle checkpoints are refused",
    ),
    Case(
        "pickle-bin-chunk",
        lambda e: raw(
            {CFG: files_of(e.good)[CFG], "adapter_model.bin": pickle_bytes()}, declare=False
        ),
        INVALID,
        "pickle checkpoints",
    ),
    Case(
        "pickle-bytes-named-safetensors",
        lambda e: raw({CFG: files_of(e.good)[CFG], WEIGHTS: pickle_bytes()}),
        INVALID,
        "not a safetensors file",
    ),
    # Broken safetensors.
    Case("truncated-safetensors", truncated, INVALID, "truncated"),
    Case(
        "header-over-cap",
        lambda e: raw(
            {CFG: files_of(e.good)[CFG], WEIGHTS: struct.pack("<Q", 5 << 20) + b"{}" * 64}
        ),
        INVALID,
        "over the cap",
    ),
    Case(
        "not-a-lora-tensor",
        lambda e: push(
            with_tensors(
                e, lambda t: t.update({"base_model.model.lm_head.weight": torch.zeros(4, 4)})
            )
        ),
        INVALID,
        "not a LoRA weight",
    ),
    Case(
        "dora-magnitude-tensor",
        lambda e: push(
            with_tensors(
                e,
                lambda t: t.update(
                    {
                        "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(
                            64
                        )
                    }
                ),
            )
        ),
        INVALID,
        "DoRA",
    ),
    Case(
        "unknown-module",
        lambda e: push(with_tensors(e, with_key_renamed("q_proj", "x_proj"))),
        INVALID,
        "is not a projection",
    ),
    Case(
        "half-missing",
        lambda e: push(
            with_tensors(
                e, lambda t: t.pop("base_model.model.model.layers.1.mlp.up_proj.lora_B.weight")
            )
        ),
        INVALID,
        "lacks lora_B",
    ),
    # Against the registered base model and the registry's caps.
    Case("wrong-shapes", wrong_shapes, INVALID, "do not fit"),
    Case(
        "rank-over-cap",
        lambda e: push(e.factory("big", rank=32)),
        INVALID,
        "over this registry's maximum of 16",
    ),
    Case(
        "rank-pattern-over-cap",
        lambda e: push(with_config(e, rank_pattern={"q_proj": 64})),
        INVALID,
        "maximum rank 16",
    ),
    Case(
        "rank-mismatch", lambda e: push(with_config(e, r=8)), INVALID, "rank 4 in the weights but 8"
    ),
    Case("nan-weights", lambda e: push(with_tensors(e, set_nan)), INVALID, "NaN/Inf"),
    Case(
        "fp64-weights",
        lambda e: push(with_tensors(e, lambda t: t.update({k: v.double() for k, v in t.items()}))),
        INVALID,
        "is not fp16, bf16 or fp32",
    ),
    # adapter_config.json.
    Case("missing-r", lambda e: push(with_config(e, r=None)), INVALID, "r: is required"),
    Case("missing-alpha", lambda e: push(with_config(e, lora_alpha=None)), INVALID, "lora_alpha"),
    Case(
        "missing-target-modules",
        lambda e: push(with_config(e, target_modules=None)),
        INVALID,
        "target_modules: is required",
    ),
    Case("not-lora", lambda e: push(with_config(e, peft_type="IA3")), INVALID, "must be 'LORA'"),
    Case("dora", lambda e: push(with_config(e, use_dora=True)), INVALID, "DoRA"),
    Case(
        "modules-to-save",
        lambda e: push(with_config(e, modules_to_save=["lm_head"])),
        INVALID,
        "modules_to_save is not supported",
    ),
    Case("bias", lambda e: push(with_config(e, bias="all")), INVALID, "only bias='none'"),
    Case(
        "config-not-json",
        lambda e: raw({CFG: b"{nope", WEIGHTS: files_of(e.good)[WEIGHTS]}),
        INVALID,
        "is not valid JSON",
    ),
    Case(
        "bad-pattern-regex",
        lambda e: push(with_config(e, alpha_pattern={"(": 2})),
        INVALID,
        "is not a valid regex",
    ),
    # Names that could escape the store.
    Case("id-traversal", with_header(adapter_id="../../etc"), INVALID, "not a valid adapter id"),
    Case("id-absolute", with_header(adapter_id="/etc/passwd"), INVALID, "not a valid adapter id"),
    Case("id-dotdot", with_header(adapter_id="a..b"), INVALID, "without '..'"),
    Case("id-nul", with_header(adapter_id="a\x00b"), INVALID, "not a valid adapter id"),
    Case("id-too-long", with_header(adapter_id="a" * 129), INVALID, "not a valid adapter id"),
    Case("id-uppercase", with_header(adapter_id="Adapter"), INVALID, "not a valid adapter id"),
    Case(
        "file-traversal",
        lambda e: raw({"../adapter_config.json": b"{}"}, declare=False),
        INVALID,
        "is not an adapter file",
    ),
    Case(
        "file-absolute",
        lambda e: raw({"/tmp/adapter_model.safetensors": b"x"}, declare=False),
        INVALID,
        "is not an adapter file",
    ),
    Case("base-traversal", with_header(base_model="../x"), INVALID, "not a valid base model id"),
    # Stream shape.
    Case("empty-stream", lambda e: [], INVALID, "must be its header"),
    Case("chunk-first", lambda e: push(e.good)[1:], INVALID, "must be its header"),
    Case("two-headers", lambda e: push(e.good)[:1] * 2, INVALID, "only the first message"),
    Case("offset-gap", offset_gap, INVALID, "expected"),
    Case("sha256-mismatch", bad_sha, INVALID, "sha256 of the received bytes does not match"),
    Case(
        "declared-over-cap",
        lambda e: [
            R.PushAdapterRequest(
                header=R.PushAdapterHeader(
                    adapter_id="big",
                    sample_inputs=SAMPLES,
                    files=[common_pb2.FileInfo(name=WEIGHTS, size_bytes=5 << 30)],
                )
            )
        ],
        INVALID,
        "over the cap",
    ),
    Case(
        "missing-file",
        lambda e: raw({CFG: files_of(e.good)[CFG]}),
        INVALID,
        "missing from the upload",
    ),
    Case("no-sample-inputs", with_header(sample_inputs=[]), INVALID, "at least one sample input"),
    Case("cut-off-mid-stream", cut_off, INVALID, "upload incomplete"),
    Case("client-cancels", lambda e: push(e.good), grpc.StatusCode.CANCELLED, "", cancel_after=3),
    # Preconditions.
    Case(
        "base-not-registered",
        with_header(base_model="llama-unknown"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "is not registered",
    ),
]


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    return write_lora_adapter(
        tmp_path_factory.mktemp("good") / "good", tiny_model_dir, rank=4, base_model_id=BASE
    )


async def _send(stub, requests: Requests, cancel_after: int):
    """Run one upload; returns ``(code, details, error)`` (code OK means it was accepted)."""
    if not cancel_after:
        try:
            await stub.PushAdapter(iter(requests))
        except grpc.RpcError as err:
            return err.code(), err.details() or "", err
        return grpc.StatusCode.OK, "", None
    sent = asyncio.Event()

    async def gen():
        for i, req in enumerate(requests):
            if i == cancel_after:
                sent.set()
                await asyncio.sleep(3600)  # hold the stream open until the client cancels
            yield req

    call = stub.PushAdapter(gen())
    await sent.wait()
    await asyncio.sleep(0.1)  # the server is now spooling
    call.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await call
    return await call.code(), "", None


@pytest.mark.parametrize("case", ERROR_CASES, ids=[c.id for c in ERROR_CASES])
async def test_bad_push_is_refused_and_leaves_nothing(
    case: Case, stack, registry, good_adapter, tmp_path, adapter_factory, tiny_model_factory
):
    env = SimpleNamespace(
        good=good_adapter, tmp=tmp_path, factory=adapter_factory, model_factory=tiny_model_factory
    )
    requests = case.build(env)
    blobs_before = stack.blob_files()
    async with registry() as client:
        code, details, err = await _send(client.registry, requests, case.cancel_after)
        assert code == case.code, (case.id, code, details)
        assert case.message in details, (case.id, details)
        if code == INVALID:
            assert parse_rpc_error(err).violations, f"{case.id}: no BadRequest field violation"

        # Nothing stays behind: no record, no blob, no spool, no point.
        listed = await client.registry.ListAdapters(
            R.ListAdaptersRequest(filter=R.AdapterFilter(include_deleted=True))
        )
        assert listed.total_size == 0, f"{case.id}: a record was created"
        for _ in range(100):  # a cancelled call is cleaned up by the server after the cancel
            if not stack.spool_files():
                break
            await asyncio.sleep(0.02)
        assert stack.spool_files() == [], f"{case.id}: spool left behind"
        assert stack.blob_files() == blobs_before, f"{case.id}: a blob was stored"
        assert stack.points_of("bad-adapter") == 0


async def test_refusal_in_mid_stream_reaches_an_asyncio_client(stack, registry, good_adapter):
    """A header refused while the client still streams 2,000 chunks: it gets the real status.

    grpc's asyncio client turns a write that fails after the server ended the call into
    INTERNAL (grpc/grpc#36066); the server reads the rest of the stream before refusing.
    """
    header = R.PushAdapterHeader(adapter_id="a..b", base_model=BASE, sample_inputs=SAMPLES)
    chunk = b"\0" * 4096
    requests = [R.PushAdapterRequest(header=header)] + [
        R.PushAdapterRequest(
            chunk=common_pb2.FileChunk(file_name=WEIGHTS, offset=i * len(chunk), data=chunk)
        )
        for i in range(2000)
    ]
    async with registry() as client:
        for _ in range(50):
            code, details, _err = await _send(client.registry, requests, 0)
            assert (code, "without '..'" in details) == (INVALID, True), (code, details)
    assert stack.spool_files() == []
