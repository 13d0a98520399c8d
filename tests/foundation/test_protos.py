"""The generated stubs are exactly what `make protos` produces, and the protos pass buf lint."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "protos"
STUB_DIR = ROOT / "loraserve" / "api" / "v1"


def _protos() -> list[str]:
    return sorted(
        str(p.relative_to(PROTO_DIR)) for p in (PROTO_DIR / "loraserve/api/v1").glob("*.proto")
    )


def test_regenerating_stubs_yields_identical_files(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            *_protos(),
        ],
        check=True,
        cwd=PROTO_DIR,
    )
    generated = sorted(p.name for p in (tmp_path / "loraserve/api/v1").iterdir())
    committed = sorted(
        p.name for p in STUB_DIR.iterdir() if p.name != "__init__.py" and p.is_file()
    )
    assert generated == committed, "run `make protos`: the set of stub files differs"
    for name in generated:
        new = (tmp_path / "loraserve/api/v1" / name).read_text()
        assert new == (STUB_DIR / name).read_text(), f"{name} is stale: run `make protos`"


def test_stubs_import_from_package_path() -> None:
    from loraserve.api.v1 import (
        executor_pb2_grpc,
        jobs_pb2_grpc,
        registry_pb2_grpc,
        retriever_pb2_grpc,
    )

    for module in (executor_pb2_grpc, jobs_pb2_grpc, registry_pb2_grpc, retriever_pb2_grpc):
        assert "from loraserve.api.v1 import" in Path(module.__file__).read_text()


def _buf() -> str | None:
    local = ROOT / ".tools/node_modules/.bin/buf"
    return str(local) if local.exists() else shutil.which("buf")


def test_buf_lint_standard() -> None:
    buf = _buf()
    if buf is None:
        if os.environ.get("CI"):
            pytest.fail("buf is not installed: `make test` installs it under .tools/")
        pytest.skip("buf not installed (run `make buf-lint` once)")
    result = subprocess.run([buf, "lint"], cwd=PROTO_DIR, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "STANDARD" in (PROTO_DIR / "buf.yaml").read_text()
