"""retriever_svc."""
