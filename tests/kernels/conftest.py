"""Kernel tests: CPU runs under Triton's interpreter; `gpu` tests need CUDA (device tool)."""

import os
import sys
from pathlib import Path

import torch

# Import the repository's `kernels` package, not this directory (also named kernels, and a
# namespace-package candidate when only tests/ is on sys.path).
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

# Must happen before `kernels` is imported: Triton reads it when the kernels are decorated.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (run through the device tool)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="CUDA is not available")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Every correctness test runs on the CPU (interpreter) and, marked `gpu`, on CUDA.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    if request.param == "cpu" and torch.cuda.is_available():
        pytest.skip("CPU variants run under the interpreter, on machines without CUDA")
    return torch.device(request.param)
