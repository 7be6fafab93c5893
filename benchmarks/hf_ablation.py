"""What the 4-bit GPU formats' engine settings cost: one setting changed at a time, on the continuous SmolLM2.

    python3 benchmarks/hf_ablation.py [--variants awq-bf16-clip,awq-bf16-noclip,...] [--samples 32]
                                      [--seq-len 256] [--group-size 64] [--tokens 4096] [--update] [--from-json]

Model: ``builtin:smollm2-135m-continuous`` (no grid its weights already sit on). Every variant is 4-bit, group 64,
calibrated on the same ``--samples`` x ``--seq-len`` tokens of the builtin calibration text, built with verify off
and scored against the base in transformers (full logits) on the two held-out texts, as ``benchmarks/quality.py``
scores them. ``--update`` replaces only the variants built now in the stored JSON.

AWQ (asymmetric), classic (GPTQModel):

* ``awq-bf16-clip``: classic AWQ as quantkit ran it before this benchmark: GPTQModel's AWQ at its defaults, which
  on a CPU load the model in bfloat16 (``gptqmodel.utils.model.auto_dtype``: "CPU + Torch Fused", whatever the
  checkpoint's dtype) and search a clipping range per group after the scales (AutoAWQ's ``apply_clip``);
* ``awq-bf16-noclip``: the same without the clipping search (``quantkit.hfquant.AWQ_CLIP_SEARCH``): quantkit's
  classic AWQ now. llm-compressor's AWQ has no clipping search either;
* ``awq-fp16-clip`` / ``awq-fp16-noclip``: loaded in float16 instead (more mantissa; GPTQModel's CPU AWQ kernel
  takes float16 or bfloat16, not float32).

GPTQ (symmetric), by ordering:

* ``gptq-gar``: classic at quantkit's defaults (``--act-order``: GPTQModel's group-aware reordering, what vLLM
  serves with grouped scales); ``gptq-noorder``: classic, ``--no-act-order``; ``gptq-noorder-staticgroups``: the
  same with GPTQModel's ``static_groups=True`` (each group's scale and zero from the weights before any GPTQ
  update, as llm-compressor 0.14 does: its ``quantize_weight`` takes the weight observer's qparams up front);
* ``gptq-ct-static``: compressed-tensors at quantkit's defaults (llm-compressor ``actorder="static"``);
  ``gptq-ct-noorder``: ``--no-act-order``.

No calibration at all: ``rtn-asym`` / ``rtn-sym``: round-to-nearest, min-max per group (llm-compressor's
``QuantizationModifier``, compressed-tensors): the floor a calibrated method should beat.

Measured (``hf_ablation.md``):

* AWQ: the clipping search is what costs, not the dtype. Without it classic AWQ matches AWQ through
  llm-compressor (``quality.md``: 0.160 eval / 0.296 unseen); with it, it loses 1.5x that on the eval text and
  1.8x on unseen prose, worse there than round-to-nearest.
* GPTQ: ordering is worth most of what GPTQ gains: group-aware ordering (classic) 0.223 vs 0.306 without;
  llm-compressor's static order 0.305 vs 0.487 without. At the same ordering GPTQModel's GPTQ loses less than
  llm-compressor's (no order: 0.306 vs 0.487), and llm-compressor's GPTQ without ordering is no better than
  symmetric round-to-nearest (0.485; unseen 0.775 vs 0.705: worse). The difference is the group scales: with
  ``static_groups=True`` (scales from the weights before GPTQ's updates, as llm-compressor computes them)
  GPTQModel falls to 0.455 / 0.756, next to llm-compressor's 0.487 / 0.775; fixed scales cannot follow the
  weights GPTQ's error feedback moves. So for GPTQ the classic format is the better engine here (0.223 vs 0.305
  at quantkit's defaults); for AWQ the two are equal and the classic one is faster.

Build seconds are the quantisation's own (the folder's record), measured with other work on the machine.

Writes ``benchmarks/hf_ablation.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("QUANTKIT_VLLM", "off")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from quantkit.util import format_table, human_size  # noqa: E402

HEAD = ["variant", "size", "text", "KLD", "ΔPPL", "top-1", "build s"]
OUT = ROOT / "benchmarks" / "hf_ablation.json"

#: name -> (method, format, quantise keywords, GPTQModel load dtype or None, AWQ clipping search or None,
#: extra GPTQConfig fields)
VARIANTS = {
    "awq-bf16-clip": ("awq", "classic", {}, "bfloat16", True, {}),
    "awq-bf16-noclip": ("awq", "classic", {}, "bfloat16", False, {}),
    "awq-fp16-clip": ("awq", "classic", {}, "float16", True, {}),
    "awq-fp16-noclip": ("awq", "classic", {}, "float16", False, {}),
    "gptq-gar": ("gptq", "classic", {}, None, None, {}),
    "gptq-noorder": ("gptq", "classic", {"act_order": False}, None, None, {}),
    "gptq-noorder-staticgroups": ("gptq", "classic", {"act_order": False}, None, None, {"static_groups": True}),
    "gptq-ct-static": ("gptq", "compressed-tensors", {}, None, None, {}),
    "gptq-ct-noorder": ("gptq", "compressed-tensors", {"act_order": False}, None, None, {}),
}
RTN = {"rtn-asym": False, "rtn-sym": True}


@contextlib.contextmanager
def gptqmodel_settings(dtype: str | None, clip: bool | None, gptq_cfg: dict):
    """GPTQModel's load dtype, quantkit's AWQ clipping-search setting and extra GPTQConfig fields for the duration
    of one quantisation (``None`` / empty: as quantkit has them)."""
    import gptqmodel.quantization as gq
    import torch
    from gptqmodel import GPTQModel

    from quantkit import hfquant

    load, before, config = GPTQModel.load, hfquant.AWQ_CLIP_SEARCH, gq.GPTQConfig

    def _load(*a, **kw):
        kw["dtype"] = getattr(torch, dtype)
        return load(*a, **kw)

    if dtype is not None:
        GPTQModel.load = _load
    if clip is not None:
        hfquant.AWQ_CLIP_SEARCH = clip
    if gptq_cfg:
        gq.GPTQConfig = lambda **kw: config(**kw, **gptq_cfg)
    try:
        yield
    finally:
        GPTQModel.load, hfquant.AWQ_CLIP_SEARCH, gq.GPTQConfig = load, before, config


def build_rtn(base: Path, out: Path, group: int, sym: bool) -> Path:
    """Round-to-nearest, min-max per group, no calibration (llm-compressor, compressed-tensors)."""
    if (out / "config.json").is_file():
        return out
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    w = QuantizationArgs(num_bits=4, type="int", symmetric=sym, strategy="group", group_size=group)
    scheme = QuantizationScheme(targets=["Linear"], weights=w)
    oneshot(model=model, recipe=[QuantizationModifier(config_groups={"g": scheme}, ignore=["lm_head"])])
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp, save_compressed=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join([*VARIANTS, *RTN]))
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "quantkit-bench" / "hf_ablation"))
    ap.add_argument("--update", action="store_true", help="keep the stored rows of variants not built now")
    ap.add_argument("--from-json", action="store_true", help="re-render the table from the stored JSON")
    a = ap.parse_args(argv)
    if a.from_json:
        return write(json.loads(OUT.read_text()), a)
    from quality import score, with_stored

    from quantkit.awq import quantize_awq
    from quantkit.demo import resolve_builtin
    from quantkit.gptq import quantize_gptq

    base = resolve_builtin("builtin:smollm2-135m-continuous")
    work = Path(a.work)
    built = []
    for v in a.variants.split(","):
        t0 = time.perf_counter()
        if v in RTN:
            folder = build_rtn(base, work / v, a.group_size, RTN[v])
            size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
            built.append({"variant": v, "path": str(folder), "size": size, "verify": {"bits": 4},
                          "seconds": round(time.perf_counter() - t0, 1)})
            continue
        method, fmt, kw, dtype, clip, gptq_cfg = VARIANTS[v]
        fn = quantize_awq if method == "awq" else quantize_gptq
        with gptqmodel_settings(dtype, clip, gptq_cfg):
            res = fn(str(base), group_size=a.group_size, samples=a.samples, seq_len=a.seq_len, fmt=fmt,
                     out=work / v, verify=False, **kw)
        # the quantisation's own seconds, from the folder's record (a cached folder keeps its build's)
        built.append({"variant": v, "path": str(res.folder), "size": res.artifact.get("size"),
                      "verify": {"bits": 4}, "seconds": res.artifact.get("seconds")})
    rows = score(base, built, a.tokens)
    if a.update:
        rows = with_stored(rows, OUT)
    write(rows, a)


def write(rows: list[dict], a) -> None:
    order = [*VARIANTS, *RTN]
    rows.sort(key=lambda r: (r["text"], order.index(r["variant"])))
    text = (f"4-bit, group {a.group_size}, on builtin:smollm2-135m-continuous (base PPL {rows[0]['base_ppl']:.3f} "
            f"on the eval text); calibration {a.samples} x {a.seq_len} tokens of the builtin calibration text; "
            f"{rows[0]['tokens']} tokens per held-out text, transformers, full logits.\n\n"
            + format_table([[r["variant"], human_size(r["size"]) if r["size"] else "", r["text"],
                             f"{r['kld']:.4f} ± {r['kld_se']:.4f}",
                             f"{r['ppl_change']:+.2%} ± {r['ppl_change_se']:.2%}", f"{r['top1']:.3f}",
                             f"{r['seconds']:.0f}"] for r in rows], HEAD))
    OUT.write_text(json.dumps(rows, indent=1, default=str))
    OUT.with_suffix(".md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
