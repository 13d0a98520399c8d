"""Comparison helper that shows the worst elements instead of a bare False."""

from __future__ import annotations

import torch


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    atol: float,
    rtol: float,
    what: str = "tensor",
    top: int = 5,
) -> None:
    """Assert |actual - expected| <= atol + rtol * |expected| everywhere (NaN never passes).

    On failure the message lists the ``top`` largest absolute errors with their indices, and
    the relative error of the whole tensor (||a - e|| / ||e||).
    """
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    err = (a - e).abs()
    bad = ~(err <= atol + rtol * e.abs())  # NaN compares False, so NaN is bad
    if not bool(bad.any()):
        return
    flat = torch.where(torch.isnan(err), torch.full_like(err, float("inf")), err).flatten()
    worst = flat.topk(min(top, flat.numel())).indices
    lines = []
    for i in worst.tolist():
        idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), a.shape))
        lines.append(
            f"  at {idx}: got {a[idx].item():.6g}, expected {e[idx].item():.6g}, "
            f"|err| {err[idx].item():.3g}"
        )
    rel = (a - e).norm() / e.norm().clamp_min(1e-30)
    raise AssertionError(
        f"{what}: {int(bad.sum())} of {a.numel()} elements off (atol={atol}, rtol={rtol}), "
        f"relative error {rel.item():.3g}; worst:\n" + "\n".join(lines)
    )
