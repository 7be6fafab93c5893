"""Why classic AWQ (GPTQModel) loses more than AWQ through llm-compressor: one setting changed at a time.

    python3 benchmarks/awq_ablation.py [--variants bf16-clip,fp32-clip,fp32-noclip,rtn] [--samples 32]
                                       [--seq-len 256] [--group-size 64] [--tokens 4096]

Model: ``builtin:smollm2-135m-continuous`` (no grid its weights already sit on). Every variant is 4-bit,
asymmetric, group 64, calibrated on the same ``--samples`` x ``--seq-len`` tokens of the builtin calibration
text, and scored against the base in transformers (full logits) on the two held-out texts, as
``benchmarks/quality.py`` scores them:

* ``bf16-clip``: classic AWQ as quantkit ran it before this benchmark: GPTQModel's AWQ at its defaults, which on a
  CPU load the model in bfloat16 (``gptqmodel.utils.model.auto_dtype``: "CPU + Torch Fused", whatever the
  checkpoint's dtype) and search a clipping range per group after the scales (AutoAWQ's ``apply_clip``);
* ``bf16-noclip``: the same without the clipping search (``quantkit.hfquant.AWQ_CLIP_SEARCH``): quantkit's
  classic AWQ now. llm-compressor's AWQ has no clipping search either;
* ``fp16-clip`` / ``fp16-noclip``: loaded in float16 instead (more mantissa; GPTQModel's CPU AWQ kernel takes
  float16 or bfloat16, not float32);
* ``rtn``: no calibration at all: round-to-nearest, min-max per group (llm-compressor's ``QuantizationModifier``,
  compressed-tensors), the floor any calibrated method should beat.

Measured (``awq_ablation.md``): the clipping search is what costs, not the dtype. Without it classic AWQ matches
AWQ through llm-compressor (``quality.md``: 0.160 eval / 0.296 unseen); with it, it loses 1.5x that on the eval
text and 1.8x on unseen prose, worse there than round-to-nearest. Build seconds are the quantisation's own (the
folder's record), measured with other work on the machine.

Writes ``benchmarks/awq_ablation.json`` and ``.md``.
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

VARIANTS = {"bf16-clip": ("bfloat16", True), "fp16-clip": ("float16", True), "fp16-noclip": ("float16", False),
            "bf16-noclip": ("bfloat16", False)}


@contextlib.contextmanager
def gptqmodel_settings(dtype: str, clip: bool):
    """GPTQModel's load dtype and quantkit's AWQ clipping-search setting for the duration of one quantisation."""
    import torch
    from gptqmodel import GPTQModel

    from quantkit import hfquant

    load, before = GPTQModel.load, hfquant.AWQ_CLIP_SEARCH

    def _load(*a, **kw):
        kw["dtype"] = getattr(torch, dtype)
        return load(*a, **kw)

    GPTQModel.load, hfquant.AWQ_CLIP_SEARCH = _load, clip
    try:
        yield
    finally:
        GPTQModel.load, hfquant.AWQ_CLIP_SEARCH = load, before


def build_seconds(folder: Path) -> float | None:
    """The quantisation's own seconds, from the folder's record (a cached folder keeps its build's)."""
    rec = json.loads((folder / "quantkit.json").read_text()) if (folder / "quantkit.json").is_file() else {}
    return next(iter(rec.get("artifacts", {}).values()), {}).get("seconds")


def build_rtn(base: Path, out: Path, group: int) -> Path:
    """Round-to-nearest, asymmetric, min-max per group, no calibration (llm-compressor, compressed-tensors)."""
    if (out / "config.json").is_file():
        return out
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    w = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=group)
    oneshot(model=model, recipe=[QuantizationModifier(config_groups={"g": QuantizationScheme(targets=["Linear"],
                                                                                               weights=w)},
                                                      ignore=["lm_head"])])
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp, save_compressed=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="bf16-clip,bf16-noclip,fp16-clip,fp16-noclip,rtn")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "quantkit-bench" / "awq_ablation"))
    ap.add_argument("--from-json", action="store_true", help="re-render the table from the stored JSON")
    a = ap.parse_args(argv)
    out = ROOT / "benchmarks" / "awq_ablation.json"
    if a.from_json:
        return write(json.loads(out.read_text()), a)
    from quality import score

    from quantkit.awq import quantize_awq
    from quantkit.demo import resolve_builtin

    base = resolve_builtin("builtin:smollm2-135m-continuous")
    work = Path(a.work)
    built = []
    for v in a.variants.split(","):
        t0 = time.perf_counter()
        if v == "rtn":
            folder = build_rtn(base, work / v, a.group_size)
            size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
            built.append({"variant": v, "path": str(folder), "size": size, "verify": {"bits": 4},
                          "seconds": round(time.perf_counter() - t0, 1)})
            continue
        with gptqmodel_settings(*VARIANTS[v]):
            res = quantize_awq(str(base), group_size=a.group_size, samples=a.samples, seq_len=a.seq_len,
                               fmt="classic", out=work / v, verify=False)
        built.append({"variant": v, "path": str(res.folder), "size": res.artifact.get("size"),
                      "verify": {"bits": 4}, "seconds": build_seconds(res.folder)})
    rows = score(base, built, a.tokens)
    rows.sort(key=lambda r: (r["text"], r["variant"]))
    write(rows, a)


def write(rows: list[dict], a) -> None:
    for r in rows:  # a folder cached from an earlier run keeps its own build's seconds
        r["seconds"] = build_seconds(Path(r["path"])) or r["seconds"] if Path(r["path"]).is_dir() else r["seconds"]
    text = (f"AWQ 4-bit asymmetric, group {a.group_size}, on builtin:smollm2-135m-continuous (base PPL "
            f"{rows[0]['base_ppl']:.3f} on the eval text); calibration {a.samples} x {a.seq_len} tokens of the "
            f"builtin calibration text; {rows[0]['tokens']} tokens per held-out text, transformers, full logits.\n\n"
            + format_table([[r["variant"], human_size(r["size"]) if r["size"] else "", r["text"],
                             f"{r['kld']:.4f} ± {r['kld_se']:.4f}",
                             f"{r['ppl_change']:+.2%} ± {r['ppl_change_se']:.2%}", f"{r['top1']:.3f}",
                             f"{r['seconds']:.0f}"] for r in rows], HEAD))
    (ROOT / "benchmarks" / "awq_ablation.json").write_text(json.dumps(rows, indent=1, default=str))
    (ROOT / "benchmarks" / "awq_ablation.md").write_text(text + "\n")
    print(text)

if __name__ == "__main__":
    main()
