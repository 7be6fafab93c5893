"""``quantkit awq``: activation-aware 4-bit weight quantisation (AWQ) of a Hugging Face model.

``classic`` format (default): GPTQModel's AWQ (GEMM layout, ``quant_method: awq``, asymmetric with zero
points), read by vLLM, TGI, SGLang and transformers. ``compressed-tensors``: llm-compressor's AWQModifier
(``W4A16`` asymmetric, ``pack-quantized``), vLLM's native format. See :mod:`quantkit.hfquant`.
"""

from __future__ import annotations

import os

from quantkit.hfquant import DEFAULT_FORMAT, QuantResult, run

__all__ = ["quantize_awq", "QuantResult"]


def quantize_awq(model, *, bits: int = 4, group_size: int = 128, calibration: str | None = None,
                 samples: int = 128, seq_len: int = 2048, fmt: str = DEFAULT_FORMAT,
                 out: str | os.PathLike | None = None, revision: str | None = None, allow_pickle: bool = False,
                 device: str = "auto", offload: bool = False, verify: bool = True,
                 adapter: str | None = None, adapter_revision: str | None = None,
                 engine: str = "auto") -> QuantResult:
    """Quantise MODEL (Hub id or local folder) with AWQ into ``out`` (default ``./<Model>-AWQ-INT4-g128``,
    or ``./<Model>-AWQ-W4A16-g128`` for compressed-tensors). Re-running on an intact folder is a no-op."""
    return run("awq", model, fmt=fmt, bits=bits, group_size=group_size, calibration=calibration,
               samples=samples, seq_len=seq_len, out=out, revision=revision, allow_pickle=allow_pickle,
               device=device, offload=offload, verify=verify, adapter=adapter, adapter_revision=adapter_revision,
               engine=engine)
