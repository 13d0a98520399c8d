"""Building blocks of the decoder: norms, rotary embedding, attention over the paged KV cache,
and the LoRA-aware linear layers."""
