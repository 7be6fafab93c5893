"""``quantkit gptq``: GPTQ 4- or 8-bit weight quantisation of a Hugging Face model.

``classic`` format (default): GPTQModel (``quant_method: gptq``, ``desc_act`` = ``--act-order``), read by
vLLM, TGI, SGLang, ExLlama and transformers (with optimum + gptqmodel). ``compressed-tensors``:
llm-compressor's GPTQModifier (``W4A16``/``W8A16``, ``actorder: static`` with ``--act-order``),
vLLM's native format. See :mod:`quantkit.hfquant`.
"""

from __future__ import annotations

import os

from quantkit.hfquant import DEFAULT_FORMAT, QuantResult, run

__all__ = ["quantize_gptq", "QuantResult"]


def quantize_gptq(model, *, bits: int = 4, group_size: int = 128, act_order: bool = True,
                  damp: float = 0.01, sym: bool = True, calibration: str | None = None, samples: int = 128,
                  seq_len: int = 2048, fmt: str = DEFAULT_FORMAT, out: str | os.PathLike | None = None,
                  revision: str | None = None, allow_pickle: bool = False, device: str = "auto",
                  offload: bool = False, verify: bool = True, adapter: str | None = None,
                  adapter_revision: str | None = None, engine: str = "auto") -> QuantResult:
    """Quantise MODEL (Hub id or local folder) with GPTQ into ``out`` (default ``./<Model>-GPTQ-INT4-g128``,
    ``-asym`` appended for --asym; ``W4A16``/``W8A16`` for compressed-tensors). Re-running on an intact
    folder is a no-op."""
    return run("gptq", model, fmt=fmt, bits=bits, group_size=group_size, sym=sym, act_order=act_order,
               damp=damp, calibration=calibration, samples=samples, seq_len=seq_len, out=out,
               revision=revision, allow_pickle=allow_pickle, device=device, offload=offload,
               verify=verify, adapter=adapter, adapter_revision=adapter_revision, engine=engine)
