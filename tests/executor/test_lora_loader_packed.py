"""The serving layer's packed read of an adapter file: the same tensors and scales as
safetensors' loader, already in the host cache's one-buffer slot layout; malformed files
refused with a reason."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from executor_svc.adapters.host_cache import HostCache, is_packed, pack_weights
from executor_svc.model.lora_loader import load_adapter


def _assert_same(got, want) -> None:
    assert sorted(got) == sorted(want)
    for layer in want:
        assert sorted(got[layer]) == sorted(want[layer])
        for name, w in want[layer].items():
            g = got[layer][name]
            assert g.scale == w.scale, (layer, name)
            assert g.a.dtype == w.a.dtype and torch.equal(g.a, w.a), (layer, name, "A")
            assert g.b.dtype == w.b.dtype and torch.equal(g.b, w.b), (layer, name, "B")


@pytest.mark.parametrize("dtype", [None, torch.float32, torch.bfloat16, torch.float16])
def test_packed_read_equals_loader_then_pack(dtype, adapter_factory):
    path = adapter_factory(
        "pat",
        rank=4,
        alpha=8,
        rank_pattern={"q_proj": 8, "layers.1.mlp.up_proj": 2},
        alpha_pattern={"down_proj": 32},
        target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
    )
    got = load_adapter(path, dtype=dtype, packed=True)
    want = pack_weights(load_adapter(path, dtype=dtype), pin=False)
    _assert_same(got, want)
    assert is_packed(got, pin=False) and not is_packed(load_adapter(path), pin=False)
    assert HostCache(1 << 30, pin_memory=False).prepare(got) is got  # no second copy


def test_mixed_dtypes_read_as_float32(adapter_factory, tmp_path):
    src = adapter_factory("mix", rank=4)
    tensors = load_file(src / "adapter_model.safetensors")
    mixed = {k: v.bfloat16() if "lora_B" in k else v for k, v in tensors.items()}
    out = tmp_path / "mixed"
    shutil.copytree(src, out)
    save_file(mixed, out / "adapter_model.safetensors")
    got = load_adapter(out, packed=True)
    _assert_same(got, load_adapter(out, dtype=torch.float32))
    assert is_packed(got, pin=False)


def _rewrite(src, dst, *, header=None, cut: int = 0, raw: bytes | None = None):
    shutil.copytree(src, dst)
    f = dst / "adapter_model.safetensors"
    data = f.read_bytes()
    if raw is not None:
        data = raw
    elif header is not None:
        n = int.from_bytes(data[:8], "little")
        head = json.loads(data[8 : 8 + n])
        header(head)
        new = json.dumps(head).encode()
        data = len(new).to_bytes(8, "little") + new + data[8 + n :]
    f.write_bytes(data[: len(data) - cut])
    return dst


def _first_b(head: dict) -> str:
    return next(k for k in head if "lora_B" in k)


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("truncated", "outside the file"),
        ("no_header", "not a safetensors file"),
        ("garbage_header", "unreadable safetensors header"),
        ("int_dtype", "unsupported or malformed"),
        ("wrong_shape", "does not match"),
        ("float_offsets", "non-negative integers"),
        ("missing_b", "must both be present"),
        ("rank_mismatch", "config says rank"),
        ("foreign_tensor", "unexpected tensor"),
    ],
)
def test_malformed_files_are_refused(case, match, adapter_factory, tmp_path):
    src = adapter_factory("ok", rank=4)
    dst = tmp_path / case
    if case == "truncated":
        _rewrite(src, dst, cut=100)
    elif case == "no_header":
        _rewrite(src, dst, raw=b"\xff" * 4)
    elif case == "garbage_header":
        _rewrite(src, dst, raw=(10).to_bytes(8, "little") + b"not json!!" + b"\0" * 64)
    elif case == "int_dtype":
        _rewrite(src, dst, header=lambda h: h[_first_b(h)].update(dtype="I64"))
    elif case == "float_offsets":
        _rewrite(src, dst, header=lambda h: h[_first_b(h)].update(data_offsets=[0.0, 8.5]))
    elif case == "wrong_shape":
        _rewrite(src, dst, header=lambda h: h[_first_b(h)].update(shape=[3, 3]))
    elif case == "missing_b":
        _rewrite(src, dst, header=lambda h: h.pop(_first_b(h)))
    elif case == "rank_mismatch":
        shutil.copytree(src, dst)
        config = json.loads((dst / "adapter_config.json").read_text())
        (dst / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    else:
        _rewrite(src, dst, header=lambda h: h.update(extra=dict(h[_first_b(h)])))
    with pytest.raises(ValueError, match=match):
        load_adapter(dst, packed=True)
