"""TrainRetriever end to end: JobService -> Celery (queue train) -> fine-tune -> switch."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from retriever_fixtures import BASE, QUERIES, SAMPLES, Stack, retriever_stack

from loraserve import vectors as V
from loraserve.api.v1 import jobs_pb2, retriever_pb2
from loraserve.settings import CommonSettings
from registry_svc import jobs
from registry_svc.db import open_database
from retriever_svc.heldout import Split, accuracy
from retriever_svc.settings import RetrieverSettings
from retriever_svc.training import run_training

TASKS = ("sentiment", "translation", "arithmetic", "sql", "poetry")


@pytest.fixture(autouse=True)
def short_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """A few optimizer steps: the job's path is under test here, not the model's quality."""
    monkeypatch.setenv("LORASERVE_RETRIEVER_TRAIN_MAX_STEPS", "3")


async def push_tasks(st: Stack, adapters, tasks=TASKS) -> None:
    for i, task in enumerate(tasks):
        await st.push(task, adapters[i], SAMPLES[task], domain=task)


async def train(st: Stack, **kw) -> tuple[jobs_pb2.Job, list[jobs_pb2.Job]]:
    resp = await st.jobs.TrainRetriever(
        jobs_pb2.TrainRetrieverRequest(base_model=kw.pop("base_model", BASE), **kw)
    )
    assert resp.job.kind == jobs_pb2.JOB_KIND_TRAIN_RETRIEVER
    return await st.wait_job(resp.job.job_id)


async def retrieve(st: Stack, prompts: list[str]) -> retriever_pb2.RetrieveResponse:
    return await st.retriever.Retrieve(
        retriever_pb2.RetrieveRequest(prompts=prompts, base_model=BASE)
    )


async def test_train_retriever_switches_collections(tmp_path, tiny_model_dir, tiny_adapters):
    async with retriever_stack(tmp_path, tiny_model_dir) as st:
        await push_tasks(st, tiny_adapters, TASKS[:4])
        before = await retrieve(st, list(QUERIES.values()))
        client = V.open_qdrant(st.common)
        old = V.active_collection(client)

        job, updates = await train(st, epochs=1, batch_size=4, seed=3)
        assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.message
        progress = [u.progress for u in updates]
        assert progress == sorted(progress) and progress[-1] == 1.0 and len(updates) >= 3
        assert job.metrics["steps"] == 3 and job.metrics["heldout_samples"] == 4
        assert job.metrics["heldout_top1_after"] >= job.metrics["heldout_top1_before"]
        # every adapter has a domain of its own: no out-of-distribution figure to report
        assert "heldout_ood_top1_after" not in job.metrics

        new = job.result
        assert V.active_collection(client) == new != old
        model_id, model_dir = V.collection_model(client, new)
        assert model_id and Path(model_dir).is_dir()
        assert client.count(new).count == client.count(old).count  # every point re-embedded
        index = json.loads((st.common.data_dir / "models" / "index.json").read_text())
        assert index[new]["previous"] == old and index[new]["job_id"] == job.job_id

        # The running retriever follows the alias and embeds with the new model; an adapter
        # pushed after the switch is ingested into the new collection with the new model.
        await st.push("poetry", tiny_adapters[4], SAMPLES["poetry"], domain="poetry")
        after = await retrieve(st, list(QUERIES.values()))
        assert after.embedding_model == model_id != before.embedding_model
        assert [p.candidates[0].adapter_id for p in after.plans] == list(QUERIES)


async def test_failing_heldout_check_keeps_the_old_collection(
    tmp_path, tiny_model_dir, tiny_adapters, monkeypatch
):
    async with retriever_stack(tmp_path, tiny_model_dir) as st:
        # Too small a pool is refused with its reason.
        job, _ = await train(st)
        assert job.state == jobs_pb2.JOB_STATE_FAILED and "at least 2" in job.message

        await push_tasks(st, tiny_adapters, TASKS[:3])
        client = V.open_qdrant(st.common)
        old = V.active_collection(client)
        collections = {c.name for c in client.get_collections().collections}
        # Demand an improvement no model can reach: the held-out check must refuse.
        monkeypatch.setenv("LORASERVE_RETRIEVER_TRAIN_MIN_GAIN", "2.0")
        job, _ = await train(st, epochs=1)
        assert job.state == jobs_pb2.JOB_STATE_FAILED
        assert "held-out top-1" in job.message and old in job.message
        assert "heldout_top1_after" in job.metrics
        assert V.active_collection(client) == old
        assert {c.name for c in client.get_collections().collections} == collections
        assert not any((st.common.data_dir / "models").glob("retriever-ft-*"))
        resp = await retrieve(st, [QUERIES["sql"]])
        assert not resp.embedding_model.startswith("retriever-ft-")


async def test_the_same_domain_term_is_chosen_by_settings(
    tmp_path, tiny_model_dir, tiny_adapters, monkeypatch
):
    # Two domains with two adapters each: the same-domain term has pairs in every batch.
    domains = dict(zip(TASKS, ("text", "generation", "code", "code", "generation"), strict=True))
    monkeypatch.setenv("LORASERVE_RETRIEVER_TRAIN_MIN_GAIN", "2.0")  # both start from MiniLM
    async with retriever_stack(tmp_path, tiny_model_dir) as st:
        for i, task in enumerate(TASKS):
            await st.push(task, tiny_adapters[i], SAMPLES[task], domain=domains[task])
        losses = {}
        for term in ("WITH_OWN", "LEAVE_OWN_OUT"):
            monkeypatch.setenv("LORASERVE_RETRIEVER_TRAIN_DOMAIN_TERM", term)
            job, _ = await train(st, epochs=1, batch_size=5, seed=1)
            assert job.state == jobs_pb2.JOB_STATE_FAILED and "held-out top-1" in job.message
            assert "heldout_ood_top1_before" in job.metrics  # peers exist: reported
            losses[term] = job.metrics["mean_loss"]
        # same batches, same starting model: only the domain term differs
        assert losses["WITH_OWN"] != pytest.approx(losses["LEAVE_OWN_OUT"], rel=1e-3)
    with pytest.raises(ValueError, match="train_domain_term"):
        RetrieverSettings(train_domain_term="NEAREST")


def test_a_redelivered_finished_job_is_not_run_again(tmp_path) -> None:
    common = CommonSettings(data_dir=tmp_path / "data")
    db = open_database(common)
    jobs.create_job(db, "train-retriever-1", jobs.KIND_TRAIN_RETRIEVER)
    jobs.set_job(db, "train-retriever-1", state=jobs.SUCCEEDED, result="adapters__x")
    settings = RetrieverSettings(common=common)
    assert run_training(settings, "train-retriever-1", {"base_model": BASE}) == "adapters__x"
    assert jobs.get_job(db, "train-retriever-1").state == jobs.SUCCEEDED


class _FakeEmbedder:
    """Each text is its own 2-d vector, written as "x,y"."""

    def embed(self, texts, use_cache=False):
        vecs = np.array([[float(v) for v in t.split(",")[:2]] for t in texts], dtype=np.float32)
        return SimpleNamespace(vectors=vecs / np.linalg.norm(vecs, axis=1, keepdims=True))


def test_heldout_reports_out_of_distribution_same_domain_top1() -> None:
    # a and b share a domain; c lies between them; d's domain has no other adapter.
    split = Split(
        train={"a": ["1,0"], "b": ["1,0.2"], "c": ["1,0.5"], "d": ["0,1"]},
        held={"a": ["1,0.05"], "b": ["1,0.45,x"], "c": [], "d": ["0.1,1"]},
    )
    domains = {"a": "x", "b": "x", "c": "y", "d": "z"}
    got = accuracy(_FakeEmbedder(), split, ks=(1,), domains=domains)
    assert got["top1"] == pytest.approx(2 / 3)  # b's sample is nearer c's centroid
    # a's sample without a -> b (same domain); b's without b -> c (not); d has no peer
    assert got["ood_top1"] == pytest.approx(1 / 2)
    assert "ood_top1" not in accuracy(_FakeEmbedder(), split, ks=(1,))
    assert math.isnan(accuracy(_FakeEmbedder(), split, domains={})["ood_top1"])


def test_old_collections_are_retired_after_a_switch(tmp_path) -> None:
    """Collections switched away from more than ``keep`` switches ago go, with their trained
    models; the active one, the rollback one and one a concurrent job is building stay."""
    from qdrant_client import QdrantClient, models

    from retriever_svc.active_model import models_dir, record_model, retire_old_collections

    common = CommonSettings(data_dir=tmp_path)
    client = QdrantClient(":memory:")
    names = [f"adapters__m{i}" for i in range(4)] + ["adapters__building"]
    for name in names:
        client.create_collection(
            name, vectors_config=models.VectorParams(size=4, distance="Cosine")
        )
    dirs = {}
    for i in (1, 2, 3):
        dirs[i] = models_dir(common) / f"m{i}"
        dirs[i].mkdir(parents=True)
        record_model(common, names[i], {"model_dir": str(dirs[i]), "previous": names[i - 1]})
    V.set_active_collection(client, names[3])

    assert retire_old_collections(common, client, names[3], keep=1) == names[:2]
    left = {c.name for c in client.get_collections().collections}
    assert left == {names[2], names[3], "adapters__building"}
    assert not dirs[1].exists() and dirs[2].exists() and dirs[3].exists()
    assert retire_old_collections(common, client, names[3], keep=1) == []  # idempotent
    assert retire_old_collections(common, client, names[3], keep=0) == [names[2]]
    assert V.active_collection(client) == names[3]
