"""Where adapters come from and how they reach GPU memory.

Follow one adapter from the network to a GPU slot through the file names:

- ``refs.py``            — keys (``AdapterKey``, ``FusionKey``) and the ``AdapterSource`` contract.
- ``registry_client.py`` — fetch from the registry (GetAdapter + resumable DownloadAdapter) into a
  content-addressed disk cache.
- ``disk_cache.py``      — LRU eviction of that disk cache under a byte budget.
- ``local_source.py``    — adapters given as local PEFT directories (``--adapter-dir``, tests).
- ``host_cache.py``      — LRU of parsed ``AdapterWeights`` in host memory (pinned on CUDA).
- ``fusion.py``          — build one fused adapter from several (FUSION plans).
- ``store.py``           — key -> host tensors: resolve, fetch, parse, fuse; shared in-flight.
- ``plans.py``           — validate a request's ``LoraPlan`` and resolve versions to keys.
- ``slot_manager.py``    — GPU slots: ref-counted leases, LRU eviction, ``model.set_lora``.
- ``residency.py``       — which adapters are where (GPU slot / host), as proto messages.
"""
