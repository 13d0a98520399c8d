"""retriever_svc: input-aware adapter retrieval, composition plans and replica routing.

Files:

- server.py: RetrieverService (Retrieve, Explain, Route) on the shared GrpcServer
- validation.py: request checks -> a Query (defaults filled in)
- active_model.py: the active collection (alias) and the embedding model that goes with it
- search.py: one batched Qdrant call per Retrieve (centroid and sample points)
- scoring.py: CENTROID / NEAREST_SAMPLE / COMBINED scores from the hits
- plans.py: SELECTION / MIXTURE / FUSION / GATE plans, min-score fallback
- routing.py: executor choice by adapter residency and load (dLoRA dispatch)
- base_models.py: unknown base model -> NOT_FOUND
- training.py: the TrainRetriever Celery task (finetune.py, heldout.py, reembed.py)
"""
