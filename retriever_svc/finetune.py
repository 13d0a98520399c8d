"""Contrastive fine-tuning of a sentence-transformers model on adapters' sample inputs.

Every adapter is a class; two sample inputs of the same adapter are a positive pair, the
other adapters' samples in the batch are the negatives (in-batch negatives, the
MultipleNegativesRankingLoss of sentence-transformers, made symmetric). A batch holds each
adapter at most once, so no in-batch "negative" is secretly a positive.

Semantics of one step (B adapters drawn without replacement, one pair each):

    a[i], p[i] = two samples of adapter i          for i in range(B)
    S = scale * cos(embed(a), embed(p))            # [B, B]
    loss = (CE(S, arange(B)) + CE(S.T, arange(B))) / 2
    loss += domain_weight * (D(S) + D(S.T)) / 2    # when adapters carry domains

The same-domain term D pulls adapters that share a domain together, so that a prompt of a task
with no adapter of its own still lands on an adapter of its domain. Two forms:

    LEAVE_OWN_OUT (default): for row i, column i (its own adapter) is removed; the softmax mass
        of the remaining row must fall on the other adapters of i's domain. This is the
        out-of-distribution retrieval itself: own adapter absent, best remaining one should
        share the domain. Rows whose domain has no other adapter in the batch are skipped.
    WITH_OWN: positives of row i are its own adapter and the same-domain ones (SupCon-style);
        the own adapter alone can satisfy it, so it pulls same-domain peers in more weakly.

    D(S) = mean over rows i of  -log( sum_{j in P(i)} exp S[i, j] / sum_{j in N(i)} exp S[i, j] )

with N(i) all columns (WITH_OWN) or all but i (LEAVE_OWN_OUT), P(i) the same-domain columns of
N(i). Measured on the 48-task pool's held-out split (docs/benchmarks.md): at weight 2,
leave-own-out raises the out-of-distribution same-domain top-1 from 74.3 to 78.6% (WITH_OWN at
weight 4: 75.9%) with the same held-out top-1 and top-3.

Based on: LoraRetriever (Zhao et al. 2024) trains its retriever contrastively on the tasks'
samples; the in-batch-negatives loss is from Henderson et al. 2017 (sentence-transformers); the
multi-positive form of the domain term from supervised contrastive learning (Khosla et al. 2020).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import torch
import torch.nn.functional as F

ProgressFn = Callable[[int, int, float], None]  # (step, total_steps, loss)


class DomainTerm(StrEnum):
    """Which columns count as positives in the same-domain term (module docstring)."""

    LEAVE_OWN_OUT = "LEAVE_OWN_OUT"
    WITH_OWN = "WITH_OWN"


@dataclass(slots=True)
class FineTuneConfig:
    epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 5e-5
    max_seq_length: int = 128
    scale: float = 20.0
    warmup_fraction: float = 0.1
    seed: int = 0
    max_steps: int = 0  # 0 = no cap (a cap keeps tests and smoke runs short)
    domain_weight: float = 0.0  # weight of the same-domain term (0 = off)
    domain_term: DomainTerm = DomainTerm.LEAVE_OWN_OUT


@dataclass(slots=True)
class FineTuneResult:
    steps: int
    final_loss: float
    mean_loss: float


def make_batches(
    groups: dict[str, list[str]], batch_size: int, rng: random.Random
) -> list[list[tuple[str, str, str]]]:
    """One epoch of (adapter, anchor, positive) batches; each adapter at most once per batch.

    Every training sample is an anchor once per epoch; its positive is another sample of the
    same adapter (itself when the adapter has a single sample).
    """
    queues: dict[str, list[str]] = {}
    for key, texts in groups.items():
        if texts:
            queues[key] = rng.sample(texts, len(texts))
    batches: list[list[tuple[str, str, str]]] = []
    while queues:
        keys = sorted(queues, key=lambda k: (-len(queues[k]), rng.random()))[:batch_size]
        batch = []
        for key in keys:
            anchor = queues[key].pop()
            others = [t for t in groups[key] if t != anchor] or [anchor]
            batch.append((key, anchor, rng.choice(others)))
            if not queues[key]:
                del queues[key]
        if len(batch) >= 2:
            batches.append(batch)
    return batches


def fine_tune(
    model_path: str | Path,
    groups: dict[str, list[str]],
    out_dir: str | Path,
    config: FineTuneConfig,
    *,
    domains: dict[str, str] | None = None,
    instruction_prefix: str = "",
    progress: ProgressFn | None = None,
) -> FineTuneResult:
    """Fine-tune the model at ``model_path`` on ``groups`` (adapter -> sample inputs); save it."""
    from sentence_transformers import SentenceTransformer

    if sum(1 for texts in groups.values() if texts) < 2:
        raise ValueError("contrastive training needs sample inputs of at least 2 adapters")
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    model = SentenceTransformer(str(model_path), device="cpu", local_files_only=True)
    serving_max_len = model.max_seq_length
    model.max_seq_length = min(config.max_seq_length, serving_max_len)
    batches = [
        b for _ in range(config.epochs) for b in make_batches(groups, config.batch_size, rng)
    ]
    if config.max_steps > 0:
        batches = batches[: config.max_steps]
    total = len(batches)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
    warmup = max(1, int(total * config.warmup_fraction))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / (total - warmup + 1)))
    )
    model.train()
    losses: list[float] = []
    step = 0
    for batch in batches:
        anchors = _embed(model, [instruction_prefix + a for _, a, _ in batch])
        positives = _embed(model, [instruction_prefix + p for _, _, p in batch])
        sim = config.scale * anchors @ positives.T
        labels = torch.arange(len(batch))
        loss = (F.cross_entropy(sim, labels) + F.cross_entropy(sim.T, labels)) / 2
        if config.domain_weight > 0 and domains:
            doms, term = [domains.get(k, "") for k, _, _ in batch], config.domain_term
            loss = (
                loss
                + config.domain_weight
                * (domain_loss(sim, doms, term) + domain_loss(sim.T, doms, term))
                / 2
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        step += 1
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step, total, losses[-1])
    model.eval()
    model.max_seq_length = serving_max_len
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    model.save(str(out_dir))
    return FineTuneResult(
        steps=step,
        final_loss=losses[-1] if losses else math.nan,
        mean_loss=sum(losses) / len(losses) if losses else math.nan,
    )


def domain_loss(sim: torch.Tensor, domains: list[str], term: DomainTerm) -> torch.Tensor:
    """D(sim) of the module docstring; ``domains[i]`` is row (and column) i's adapter's."""
    same = _same_domain(domains)
    if term is DomainTerm.WITH_OWN:
        return _multi_positive(sim, same)
    own = torch.eye(len(domains), dtype=torch.bool)
    peers = same & ~own
    rows = peers.any(dim=1)
    if not bool(rows.any()):  # no two adapters of the batch share a domain
        return sim.new_zeros(())
    return _multi_positive(sim.masked_fill(own, float("-inf"))[rows], peers[rows])


def _same_domain(domains: list[str]) -> torch.Tensor:
    """[B, B] bool: same non-empty domain, or the diagonal."""
    n = len(domains)
    same = torch.eye(n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            if domains[i] and domains[i] == domains[j]:
                same[i, j] = True
    return same


def _multi_positive(sim: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """-log of the softmax mass on the positives of each row (SupCon-style, Khosla et al. 2020)."""
    masked = sim.masked_fill(~positive, float("-inf"))
    return (torch.logsumexp(sim, dim=1) - torch.logsumexp(masked, dim=1)).mean()


def _embed(model, texts: list[str]) -> torch.Tensor:
    features = model.preprocess(texts)
    out = model(features)["sentence_embedding"]
    return F.normalize(out, dim=-1)
