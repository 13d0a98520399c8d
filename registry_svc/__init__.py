"""registry_svc: owns adapters (upload, validation, blob store, metadata, embeddings, download)."""
