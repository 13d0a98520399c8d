"""The shared Qdrant schema helpers on a real local-mode Qdrant."""

from __future__ import annotations

import threading

import numpy as np
from qdrant_client import models

from loraserve import vectors
from loraserve.settings import CommonSettings


def test_point_ids_are_deterministic_and_distinct():
    assert vectors.centroid_point_id("a", 1) == vectors.centroid_point_id("a", 1)
    ids = {
        vectors.centroid_point_id("a", 1),
        vectors.centroid_point_id("a", 2),
        vectors.sample_point_id("a", 1, 0),
        vectors.sample_point_id("a", 1, 1),
    }
    assert len(ids) == 4
    assert vectors.collection_name("all-MiniLM-L6-v2@1") == "adapters__all_minilm_l6_v2_1"


def test_local_client_is_shared_and_serialises_concurrent_writers_and_readers(tmp_path):
    settings = CommonSettings(data_dir=tmp_path)
    client = vectors.open_qdrant(settings)
    try:
        assert vectors.open_qdrant(settings) is client
        vectors.ensure_collection(client, "adapters__t", 8)
        vectors.set_active_collection(client, "adapters__t")
        assert vectors.active_collection(client) == "adapters__t"
        rng = np.random.default_rng(0)
        errors: list[BaseException] = []

        def writer(w: int) -> None:
            try:
                for i in range(40):
                    client.upsert(
                        "adapters__t",
                        [
                            models.PointStruct(
                                id=vectors.sample_point_id(f"a{w}", 1, i),
                                vector=rng.random(8).tolist(),
                                payload={vectors.P_BASE_MODEL: "m", vectors.P_STATUS: "READY"},
                            )
                        ],
                    )
            except BaseException as exc:  # noqa: BLE001 - collected for the assertion
                errors.append(exc)

        def reader() -> None:
            try:
                for _ in range(40):
                    client.query_points("adapters__t", query=[0.1] * 8, limit=5)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(3)] + [
            threading.Thread(target=reader)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert client.count("adapters__t").count == 120
    finally:
        vectors.close_qdrant(settings)
