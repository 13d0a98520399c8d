"""Units of the registry without a server: scales against PEFT, names, blob store, job store,
the upload request generator."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from loraserve.api.v1 import registry_pb2
from loraserve.devmodels import write_lora_adapter
from loraserve.errors import InvalidArgument
from loraserve.settings import CommonSettings
from loraserve.upload import iter_push_requests
from registry_svc import jobs
from registry_svc.basemodels import parse_config
from registry_svc.blobstore import BlobStore
from registry_svc.convert import READY
from registry_svc.db import close_database, open_database
from registry_svc.names import check_adapter_id, check_file_name
from registry_svc.peft_config import parse_adapter_config
from registry_svc.store import NewAdapter, create_adapter, transition
from registry_svc.validation import validate_adapter

SCALE_CASES = [
    dict(rank=8, alpha=16),
    dict(rank=8, alpha=16, use_rslora=True),
    dict(rank=8, alpha=16, rank_pattern={"q_proj": 4, r"layers\.1\.mlp\.down_proj": 2}),
    dict(rank=4, alpha=8, alpha_pattern={"v_proj": 3.0, "o_proj": 32}, use_rslora=True),
    dict(rank=4, alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 6}),
]


@pytest.mark.parametrize("kw", SCALE_CASES, ids=[str(i) for i in range(len(SCALE_CASES))])
def test_module_scales_equal_peft(kw, tmp_path, tiny_model_dir):
    """rank, alpha and scale per module, exactly as PeftModel computes them."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = write_lora_adapter(tmp_path / "a", tiny_model_dir, **kw)
    base = parse_config("tiny-llama", (tiny_model_dir / "config.json").read_text())
    got = validate_adapter(
        (adapter / "adapter_config.json").read_bytes(),
        adapter / "adapter_model.safetensors",
        base,
        max_rank=64,
        max_header_bytes=1 << 20,
    )
    ours = {s.module: (s.rank, s.scale) for s in got.module_scales}
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter)
    theirs = {
        name.removeprefix("base_model.model."): (m.r["default"], m.scaling["default"])
        for name, m in model.named_modules()
        if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling
    }
    assert ours.keys() == theirs.keys()
    for module, (rank, scale) in theirs.items():
        assert ours[module][0] == rank and ours[module][1] == pytest.approx(scale), module


def test_regex_target_modules_and_catastrophic_patterns():
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8,
           "target_modules": r".*\.layers\.0\..*(q|v)_proj"}  # fmt: skip
    spec = parse_adapter_config(json.dumps(cfg).encode(), max_rank=16)
    assert spec.targets("model.layers.0.self_attn.q_proj")
    assert not spec.targets("model.layers.1.self_attn.q_proj")
    cfg["rank_pattern"] = {"(a|aa)+$": 2}
    spec = parse_adapter_config(json.dumps(cfg).encode(), max_rank=16)
    with pytest.raises(InvalidArgument, match="takes too long"):
        spec.rank_alpha("a" * 40 + "!")


@pytest.mark.parametrize(
    "name, ok",
    [("sql-gen", True), ("a", True), ("v1.2_x-y", True), ("a" * 128, True),
     ("a" * 129, False), ("..", False), ("a..b", False), ("../x", False), ("/abs", False),
     ("A", False), ("-lead", False), (".hidden", False), ("a/b", False), ("a\x00", False),
     ("", False), ("é", False)],
)  # fmt: skip
def test_adapter_ids(name: str, ok: bool):
    if ok:
        assert check_adapter_id(name) == name
    else:
        with pytest.raises(InvalidArgument):
            check_adapter_id(name)


def test_file_names():
    assert check_file_name("adapter_model.safetensors")
    for bad in ("adapter_model.bin", "x.pt", "../adapter_config.json", "a/adapter_config.json"):
        with pytest.raises(InvalidArgument):
            check_file_name(bad)


def test_blob_store_dedupes_refuses_bad_addresses_and_collects(tmp_path: Path):
    store = BlobStore(tmp_path)
    a = store.put_bytes(b"hello")
    assert store.put_bytes(b"hello") == a and len(list(store.iter_shas())) == 1
    b = store.put_bytes(b"world")
    for bad in ("../../etc/passwd", "ab" * 31 + "..", "A" * 64, a + "\x00"):
        with pytest.raises(ValueError):
            store.path_for(bad)
    assert list(store.tmp_dir.iterdir()) == []  # spools moved or removed
    assert store.delete_unreferenced({a}, grace_s=3600) == []  # b too young
    os.utime(store.path_for(b), (time.time() - 7200,) * 2)
    assert store.delete_unreferenced({a}, grace_s=3600) == [b]
    assert store.exists(a) and not store.exists(b)


def test_job_store_api(tmp_path: Path):
    common = CommonSettings(data_dir=tmp_path)
    db = open_database(common)
    try:
        jobs.create_job(db, "train-1", jobs.KIND_TRAIN_RETRIEVER)
        jobs.update_job(common, "train-1", state="RUNNING", progress=0.5, metrics={"loss": 1.0})
        done = jobs.update_job(common, "train-1", state="SUCCEEDED", progress=2.0,
                               metrics={"top1": 0.8}, result="adapters__new")  # fmt: skip
        assert (done.state, done.progress, done.result) == ("SUCCEEDED", 1.0, "adapters__new")
        assert done.metrics == {"loss": 1.0, "top1": 0.8} and done.revision == 2 and done.done
        with pytest.raises(ValueError):
            jobs.update_job(common, "train-1", state="DONE")
        with pytest.raises(KeyError):
            jobs.update_job(common, "nope", progress=0.1)

        for i, status in enumerate([READY, "PENDING", READY]):
            row = create_adapter(db, NewAdapter(
                adapter_id=f"a{i}", version=0, base_model="tiny-llama", files=[], sha256="",
                size_bytes=0, tags=["t"], domain="d", sample_inputs=[f"s{i}", "x"]))  # fmt: skip
            if status == READY:
                transition(db, row.pk, READY)
        assert jobs.ready_adapters_with_samples(common, "tiny-llama") == [
            ("a0", 1, "d", ["t"], ["s0", "x"]),
            ("a2", 1, "d", ["t"], ["s2", "x"]),
        ]
    finally:
        close_database(common)


def test_iter_push_requests(tmp_path: Path, tiny_model_dir: Path):
    adapter = write_lora_adapter(tmp_path / "a", tiny_model_dir, rank=2, dtype=torch.float16)
    progress: list[tuple[int, int]] = []
    header = registry_pb2.PushAdapterHeader(adapter_id="x")
    reqs = list(iter_push_requests(adapter, header, chunk_size=1000,
                                   on_progress=lambda s, t: progress.append((s, t))))  # fmt: skip
    assert not header.files  # the caller's header is not modified
    files = {f.name: f for f in reqs[0].header.files}
    total = sum(f.size_bytes for f in files.values())
    assert progress[0] == (0, total) and progress[-1] == (total, total)
    data: dict[str, bytes] = {}
    for r in reqs[1:]:
        assert r.chunk.offset == len(data.get(r.chunk.file_name, b""))
        data[r.chunk.file_name] = data.get(r.chunk.file_name, b"") + r.chunk.data
    assert {k: len(v) for k, v in data.items()} == {k: f.size_bytes for k, f in files.items()}
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        next(iter_push_requests(adapter, header))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), None])
def test_non_finite_weights_refused_in_every_dtype(dtype, bad, tmp_path, tiny_model_dir):
    from safetensors.torch import load_file, save_file

    adapter = write_lora_adapter(tmp_path / "a", tiny_model_dir, rank=2, dtype=dtype)
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = sorted(tensors)[-1]
    if bad is not None:
        tensors[key][-1, -1] = bad
    tensors[sorted(tensors)[0]][0, 0] = torch.finfo(dtype).max  # large but finite is fine
    save_file(tensors, str(weights))
    base = parse_config("tiny-llama", (tiny_model_dir / "config.json").read_text())
    config = (adapter / "adapter_config.json").read_bytes()
    check = lambda: validate_adapter(config, weights, base, max_rank=16, max_header_bytes=1 << 20)  # noqa: E731
    if bad is None:
        check()
    else:
        with pytest.raises(InvalidArgument, match=rf"{key}.*1 NaN/Inf"):
            check()
