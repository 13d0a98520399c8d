"""TrainRetriever: fine-tune the embedding model on the pool, check it, switch collections.

The registry's ``JobService.TrainRetriever`` records the job and sends the Celery task
``loraserve.train_retriever`` (queue ``train``, kwargs ``job_id`` and ``request``: the
TrainRetrieverRequest fields). The steps, each reported through ``registry_svc.jobs.update_job``:

    1. read the base model's READY adapters and their sample inputs; split each adapter's
       samples into train / held out (heldout.py)
    2. contrastive fine-tuning of the active model on the train split (finetune.py);
       saved to data_dir/models/<model id>/
    3. held-out top-1 with the current and the new model: the job FAILS, leaving the alias
       untouched, if the new model does worse (or gains less than ``train_min_gain``); the
       out-of-distribution same-domain top-1 (own adapter removed) is reported alongside
    4. re-embed every READY adapter (all tenants) into a NEW collection named after the model
       (reembed.py), reconcile it with adapters that changed meanwhile
    5. move the alias ``adapters_active`` (atomic), reconcile once more, record the model in
       data_dir/models/index.json; the retriever follows the alias on its next request
    6. delete collections (and trained models) switched away from more than
       ``train_keep_previous`` switches ago (active_model.retire_old_collections)

Nothing half-written on failure: the new collection and model directory are removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

from celery import shared_task

from loraserve import vectors as V
from loraserve.embedding import Embedder
from loraserve.settings import CommonSettings
from registry_svc.db import open_database
from registry_svc.jobs import FAILED, RUNNING, SUCCEEDED, TERMINAL_STATES, get_job, update_job
from retriever_svc import reembed
from retriever_svc.active_model import (
    model_dir_for_collection,
    models_dir,
    record_model,
    retire_old_collections,
)
from retriever_svc.finetune import DomainTerm, FineTuneConfig, fine_tune
from retriever_svc.heldout import accuracy, split_samples
from retriever_svc.settings import RetrieverSettings

TASK_NAME = "loraserve.train_retriever"
log = logging.getLogger("loraserve.retriever.training")


class TrainingRefused(Exception):
    """The job cannot or should not switch models; the message is the job's failure reason."""


@shared_task(name=TASK_NAME, bind=True, acks_late=True)
def train_retriever(self: Any, job_id: str, request: dict[str, Any]) -> str:
    """Celery entry: the settings come from the app (registry) and the environment."""
    app_settings = getattr(self.app, "loraserve_settings", None)
    common = app_settings.common if app_settings is not None else CommonSettings()
    return run_training(RetrieverSettings(common=common), job_id, request)


def run_training(settings: RetrieverSettings, job_id: str, request: dict[str, Any]) -> str:
    """Run one job to its end; returns the new collection, or "" when the job failed."""
    common = settings.common
    done = get_job(open_database(common), job_id)
    if done is not None and done.state in TERMINAL_STATES:  # redelivered after it ended
        log.warning("train_retriever %s already %s; not run again", job_id, done.state)
        return done.result
    report = _Reporter(common, job_id)
    cleanup: list[Any] = []
    try:
        result = _train(settings, job_id, request, report, cleanup)
    except (TrainingRefused, ValueError, FloatingPointError) as exc:
        _undo(cleanup)
        report(state=FAILED, message=str(exc))
        return ""
    except Exception as exc:
        log.exception("train_retriever %s failed", job_id)
        _undo(cleanup)
        report(state=FAILED, message=f"internal error: {type(exc).__name__}: {exc}")
        return ""
    return result


def _train(
    settings: RetrieverSettings,
    job_id: str,
    request: dict[str, Any],
    report: _Reporter,
    cleanup: list[Any],
) -> str:
    common = settings.common
    base_model = str(request.get("base_model") or "")
    if not base_model:
        raise TrainingRefused("base_model is required")
    cfg = _config(request, settings)
    fraction = float(request.get("holdout_fraction") or settings.train_holdout_fraction)
    if not 0.0 < fraction <= 0.5:
        raise TrainingRefused(f"holdout_fraction must be in (0, 0.5]; got {fraction}")

    report(state=RUNNING, progress=0.01, message="reading the pool")
    client = V.open_qdrant(common)
    old_collection = V.active_collection(client)
    pool = reembed.read_pool(common, [base_model])
    groups: dict[str, list[str]] = {}
    domains: dict[str, str] = {}
    for (adapter_id, _), entry in pool.items():  # latest version wins (sorted by version)
        groups[adapter_id] = entry.samples
        domains[adapter_id] = entry.domain
    if len(groups) < 2:
        raise TrainingRefused(
            f"base model {base_model!r} has {len(groups)} READY adapter(s) with sample inputs; "
            "contrastive training needs at least 2"
        )
    split = split_samples(groups, fraction, cfg.seed)
    if split.held_count == 0:
        raise TrainingRefused("no held-out samples: adapters need at least 2 sample inputs")

    old_dir = model_dir_for_collection(common, old_collection)
    prefix = settings.instruction_prefix
    report(progress=0.03, message=f"held-out check of the current model ({old_dir.name})")
    before = accuracy(Embedder(old_dir, instruction_prefix=prefix), split, domains=domains)

    # Job ids share a prefix ("train-retriever-..."): name the model after a hash of the id.
    model_id = f"retriever-ft-{hashlib.sha256(job_id.encode()).hexdigest()[:12]}"
    out_dir = models_dir(common) / model_id
    cleanup.append(out_dir)
    started = time.perf_counter()

    def on_step(step: int, total: int, loss: float) -> None:
        if step == total or step % max(1, total // 20) == 0:
            report(
                progress=0.05 + 0.65 * step / total,
                message=f"step {step}/{total}",
                metrics={"loss": loss},
            )

    trained = fine_tune(
        old_dir,
        split.train,
        out_dir,
        cfg,
        domains=domains,
        instruction_prefix=prefix,
        progress=on_step,
    )
    train_s = time.perf_counter() - started
    new_embedder = Embedder(out_dir, model_id=model_id, instruction_prefix=prefix)
    report(progress=0.72, message="held-out check of the new model")
    after = accuracy(new_embedder, split, domains=domains)
    metrics = {
        "adapters": float(len(groups)),
        "train_samples": float(split.train_count),
        "heldout_samples": float(split.held_count),
        "steps": float(trained.steps),
        "final_loss": trained.final_loss,
        "mean_loss": trained.mean_loss,
        "train_seconds": train_s,
        # ood_top1 is NaN when no adapter has a same-domain peer: left out then
        **{f"heldout_{k}_before": v for k, v in before.items() if not math.isnan(v)},
        **{f"heldout_{k}_after": v for k, v in after.items() if not math.isnan(v)},
    }
    report(metrics=metrics)
    if after["top1"] < before["top1"] + settings.train_min_gain:
        raise TrainingRefused(
            f"held-out top-1 {after['top1']:.3f} with the new model vs {before['top1']:.3f} "
            f"with the current one (required gain {settings.train_min_gain:+.3f}); "
            f"keeping {old_collection or 'the current collection'}"
        )
    (out_dir / "loraserve_model.json").write_text(
        json.dumps(
            {
                "model_id": model_id,
                "parent": str(old_dir),
                "job_id": job_id,
                "base_model": base_model,
                "metrics": metrics,
            },
            indent=2,
        )
    )

    new_collection = V.collection_name(model_id)
    if new_collection == old_collection:
        raise TrainingRefused(f"job {job_id} already produced the active {new_collection}")
    cleanup.append((client, new_collection))
    reembed.create_collection(client, new_collection, new_embedder.dim, model_id, str(out_dir))
    tenants = reembed.base_models_in(client, old_collection) | {base_model}
    entries = list(reembed.read_pool(common, tenants).values())
    reembed.write_entries(
        client,
        new_collection,
        new_embedder,
        entries,
        progress=lambda i, n: report(
            progress=0.75 + 0.2 * i / n, message=f"re-embedding the pool {i}/{n}"
        ),
    )
    reembed.reconcile(common, client, new_collection, new_embedder, tenants)
    V.set_active_collection(client, new_collection)
    cleanup.clear()  # switched: from here on the new model stays
    added, removed = reembed.reconcile(common, client, new_collection, new_embedder, tenants)
    record_model(
        common,
        new_collection,
        {
            "model_id": model_id,
            "model_dir": str(out_dir),
            "previous": old_collection,
            "job_id": job_id,
            "metrics": metrics,
        },
    )
    try:  # best effort: the switch has happened, a leftover collection is only disk
        retired = retire_old_collections(
            common, client, new_collection, settings.train_keep_previous
        )
    except Exception:  # noqa: BLE001
        log.warning("train_retriever: could not retire old collections", exc_info=True)
        retired = []
    report(
        state=SUCCEEDED,
        progress=1.0,
        result=new_collection,
        message=f"switched to {new_collection} (held-out top-1 {before['top1']:.3f} -> "
        f"{after['top1']:.3f}; {added} added, {removed} removed after the switch"
        + (f"; retired {', '.join(retired)}" if retired else "")
        + ")",
    )
    return new_collection


def _config(request: dict[str, Any], settings: RetrieverSettings) -> FineTuneConfig:
    epochs = int(request.get("epochs") or settings.train_epochs)
    batch = int(request.get("batch_size") or settings.train_batch_size)
    lr = float(request.get("learning_rate") or settings.train_learning_rate)
    seed = request.get("seed")
    if not 1 <= epochs <= 20:
        raise TrainingRefused(f"epochs must be in 1..20; got {epochs}")
    if not 2 <= batch <= 512:
        raise TrainingRefused(f"batch_size must be in 2..512; got {batch}")
    if not 0.0 < lr <= 1e-2:
        raise TrainingRefused(f"learning_rate must be in (0, 0.01]; got {lr}")
    return FineTuneConfig(
        epochs=epochs,
        batch_size=batch,
        learning_rate=lr,
        max_seq_length=settings.train_max_seq_length,
        seed=int(seed) if seed is not None else 0,
        max_steps=settings.train_max_steps,
        domain_weight=settings.train_domain_weight,
        domain_term=DomainTerm(settings.train_domain_term),
    )


class _Reporter:
    def __init__(self, common: CommonSettings, job_id: str):
        self._common = common
        self._job_id = job_id

    def __call__(self, **fields: Any) -> None:
        try:
            update_job(self._common, self._job_id, **fields)
        except KeyError:  # the job row is the registry's; training goes on without it
            log.warning("train_retriever: no job %s to report to", self._job_id)


def _undo(cleanup: list[Any]) -> None:
    for item in reversed(cleanup):
        try:
            if isinstance(item, Path):
                shutil.rmtree(item, ignore_errors=True)
            else:
                client, name = item
                if V.active_collection(client) != name and client.collection_exists(name):
                    client.delete_collection(name)
        except Exception:  # noqa: BLE001 - best effort; the failure reason is reported
            log.warning("train_retriever: could not clean up %r", item, exc_info=True)
