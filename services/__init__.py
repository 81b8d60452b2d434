"""splitserve: disaggregated prefill/decode LLM serving.

The top-level package holds the deployable services (cli, local launcher,
prefill/decode/router); the engine, kernels, KV transfer and protos live in
the ``splitserve.engine``, ``.kernels``, ``.kvtransfer`` and ``.proto``
subpackages.
"""
from __future__ import annotations

__version__ = "0.1.0"
