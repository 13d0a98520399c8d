"""Retriever settings: ``LORASERVE_RETRIEVER_*`` plus the shared ``LORASERVE_*`` ones."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from loraserve.settings import DEFAULT_RETRIEVER_PORT, CommonSettings


class RetrieverSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORASERVE_RETRIEVER_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = DEFAULT_RETRIEVER_PORT
    common: CommonSettings = Field(default_factory=CommonSettings)

    # Embedding.
    instruction_prefix: str = Field(
        "",
        description="Prepended to prompts (and to samples by TrainRetriever); must match what "
        "the registry's ingestion prepends to sample inputs, which is nothing today.",
    )
    embedding_cache_size: int = Field(4096, description="LRU cache of prompt embeddings.")

    # Request limits.
    max_prompts: int = Field(256, description="Prompts per Retrieve call.")
    max_prompt_chars: int = Field(
        100_000,
        description="Longer prompts are refused; prompts over the model's window are "
        "truncated (and reported) below this.",
    )
    max_top_k: int = Field(64, description="Cap on top_k / top_n.")
    max_mixture_adapters: int = Field(
        4, description="MIXTURE plans are capped by the executor's adapters-per-token (kernels K)."
    )

    # Defaults of a Retrieve request's zero-valued fields.
    default_top_k: int = 3
    default_strategy: Literal["SELECTION", "MIXTURE", "FUSION", "GATE"] = "MIXTURE"
    default_scoring: Literal["CENTROID", "NEAREST_SAMPLE", "COMBINED"] = "CENTROID"
    default_weighting: Literal["SOFTMAX", "UNIFORM"] = "SOFTMAX"
    default_temperature: float = Field(0.05, description="Softmax temperature over cosine scores.")
    default_min_score: float = Field(
        0.1, description="Below this best score the plan is the base model."
    )
    default_top_n: int = Field(10, description="Explain's default number of candidates.")
    gate_id: str = Field("", description="Trained gate used by GATE plans (a TrainGate result).")

    # Scoring.
    centroid_weight: float = Field(
        0.7, description="COMBINED = w * centroid + (1 - w) * nearest-sample score."
    )
    nearest_samples: int = Field(
        1, description="Nearest-sample score = mean similarity of the adapter's m best samples."
    )
    candidate_factor: int = Field(
        4, description="Centroid candidates fetched per prompt = factor * k (re-ranked after)."
    )
    samples_per_candidate: int = Field(
        20, description="Sample points fetched per prompt = this * centroid candidates."
    )

    # Routing.
    stats_ttl_s: float = Field(0.2, description="How long an executor's GetStats is reused.")
    stats_timeout_s: float = Field(0.5, description="Deadline of one GetStats call.")
    route_load_slack: int = Field(
        8,
        description="A replica with the adapters resident wins unless its load exceeds the "
        "least loaded replica's by more than this (then work moves off it).",
    )
    base_model_ttl_s: float = Field(30.0, description="How long a base-model check is cached.")

    # TrainRetriever defaults (a request's zero fields). 1 epoch of batch 32 on the 48-task
    # pool: 24 steps, about 2 minutes on 2 CPU cores (docs/benchmarks.md).
    train_epochs: int = 1
    train_batch_size: int = 32
    train_learning_rate: float = 5e-5
    train_holdout_fraction: float = 0.2
    train_max_seq_length: int = 128
    train_max_steps: int = Field(0, description="Cap on optimizer steps; 0 = none.")
    train_keep_previous: int = Field(
        1,
        ge=0,
        description="Collections kept for rollback after a switch (the ones before the "
        "active); older ones and their trained models are deleted.",
    )
    # The same-domain term pulls adapters that share a domain together (adapters' domain
    # field; finetune.py). Chosen by the job's own out-of-distribution held-out figure (pool
    # samples only, 48-task pool, split seed 0; docs/benchmarks.md): WITH_OWN at weight
    # 0/1/2/4/8 -> 70.6/72.7/74.3/75.9/75.4% same-domain top-1; LEAVE_OWN_OUT at weight
    # 1/2/3/4 -> 77.0/78.6/79.1/79.7% with held-out top-1 73.8/72.7/71.7/71.7% (WITH_OWN 4:
    # 72.7%) and top-3 94.1/94.7/94.7/94.7% (94.7%). Weight 2 is the strongest that keeps both.
    train_domain_weight: float = Field(
        2.0, description="Weight of the same-domain contrastive term (0 = task term only)."
    )
    train_domain_term: Literal["LEAVE_OWN_OUT", "WITH_OWN"] = Field(
        "LEAVE_OWN_OUT",
        description="Same-domain term: LEAVE_OWN_OUT removes the sample's own adapter and asks "
        "for a same-domain one among the rest (the out-of-distribution case); WITH_OWN counts "
        "the own adapter among the positives (SupCon-style).",
    )
    train_min_gain: float = Field(
        0.0,
        description="The new model must beat the current one's held-out top-1 by this much "
        "(0: must not do worse) to be switched in.",
    )

    # Embedded Celery worker (one-machine default: no qdrant_url).
    embedded_worker: bool = Field(
        True, description="Host the ingest/train Celery worker when Qdrant is in local mode."
    )
