"""What each format costs in quality on the continuous SmolLM2-135M, and the evidence for verify's bounds.

    python3 benchmarks/quality.py [--gguf Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q3_K_M,Q2_K]
                                  [--hf gptq:classic,awq:classic,gptq:compressed-tensors,awq:compressed-tensors]
                                  [--group-size 64] [--samples 32] [--seq-len 256] [--tokens 4096]

Model: ``builtin:smollm2-135m-continuous`` (quantkit.demo: weights redrawn from their quantisation cells and
healed, so no type is favoured by a grid the weights already sit on). GGUF presets are made by
``quantize_gguf`` without an importance matrix (llama.cpp's defaults); AWQ/GPTQ by ``quantize_awq`` /
``quantize_gptq`` at their defaults except the group size (64: the default 128 does not divide SmolLM2's width
576) and the calibration size (``--samples`` x ``--seq-len`` of the builtin calibration text: the defaults,
128 x 2048, take hours on 2 CPU cores). Every artifact is verified on build
(its record's KLD on the verify window, ``quantkit.verify``) and then scored against the base in transformers
(``QUANTKIT_VLLM=off``: full-logit KLD) on two held-out texts: the builtin eval text and ``texts.unseen_text``.
Reported: size, verify KLD, mean KLD ± standard error, PPL change ± error, top-1, build seconds.
Writes ``benchmarks/quality.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("QUANTKIT_VLLM", "off")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from quantkit.evaluate import evaluate  # noqa: E402
from quantkit.texts import held_out_texts  # noqa: E402
from quantkit.util import format_table, human_size  # noqa: E402

HEADERS = ["variant", "bits", "size", "verify KLD", "text", "KLD", "ΔPPL", "top-1", "build s"]


def build(base: Path, work: Path, gguf: list[str], hf: list[str], group: int, samples: int,
          seq_len: int) -> list[dict]:
    from quantkit.awq import quantize_awq
    from quantkit.gguf import quantize_gguf
    from quantkit.gptq import quantize_gptq

    out = []
    if gguf:
        t0 = time.perf_counter()
        res = quantize_gguf(str(base), gguf, work / "gguf", threads=2)
        secs = time.perf_counter() - t0
        for t, name, path in zip(gguf, res.artifacts, res.paths()):
            a = res.manifest.artifacts[name]
            out.append({"variant": t, "path": str(path), "size": a["size"], "verify": a.get("verify"),
                        "seconds": a.get("seconds"), "run_seconds": secs})
    for combo in hf:
        method, fmt = combo.split(":")
        fn = quantize_awq if method == "awq" else quantize_gptq
        t0 = time.perf_counter()
        res = fn(str(base), group_size=group, samples=samples, seq_len=seq_len, fmt=fmt,
                 out=work / combo.replace(":", "-"))
        a = res.artifact
        out.append({"variant": combo, "path": str(res.folder), "size": a.get("size"), "verify": a.get("verify"),
                    "seconds": time.perf_counter() - t0, "group_size": group,
                    "calibration": f"{samples} x {seq_len} builtin"})
    return out


def score(base: Path, built: list[dict], tokens: int) -> list[dict]:
    rows = []
    for label, text, text_name in held_out_texts():
        rep = evaluate(str(base), [b["path"] for b in built], text=text, max_tokens=tokens, write_manifest=False,
                       engine="transformers")
        for b, r in zip(built, rep.rows):
            v = b["verify"] or {}
            rows.append({**b, "text": label, "eval_text": text_name,
                         "tokens": rep.context["tokens"], "bits": v.get("bits"), "verify_kld": v.get("kld"),
                         "verify_bound": v.get("bound"), "verify_passed": v.get("passed"),
                         "kld": r["kld_mean"], "kld_se": r["kld_se"], "ppl": r["ppl"], "base_ppl": r["base_ppl"],
                         "ppl_change": r["ppl_ratio"] - 1, "ppl_change_se": r["ppl_ratio_se"], "top1": r["top1"]})
    return rows


def with_stored(rows: list[dict], stored: Path) -> list[dict]:
    """``rows`` plus the rows in the ``stored`` JSON of variants not among them (``--update``)."""
    if not stored.is_file():
        return rows
    now = {r["variant"] for r in rows}
    return rows + [r for r in json.loads(stored.read_text()) if r["variant"] not in now]


def table(rows: list[dict]) -> str:
    return format_table([[r["variant"], r["bits"], human_size(r["size"]) if r["size"] else "",
                          f"{r['verify_kld']:.4f}" if r["verify_kld"] is not None else "-", r["text"],
                          f"{r['kld']:.4f} ± {r['kld_se']:.4f}",
                          f"{r['ppl_change']:+.2%} ± {r['ppl_change_se']:.2%}", f"{r['top1']:.3f}",
                          f"{r['seconds']:.0f}" if r.get("seconds") else ""] for r in rows], HEADERS)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", default="Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q3_K_M,Q2_K")
    ap.add_argument("--hf", default="gptq:classic,awq:classic,gptq:compressed-tensors,awq:compressed-tensors")
    ap.add_argument("--group-size", type=int, default=64, help="128, the default, does not divide SmolLM2's 576")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "quantkit-bench" / "quality"))
    ap.add_argument("--update", action="store_true",
                    help="replace only the rows of the variants built now in the stored JSON, keep the others")
    a = ap.parse_args(argv)
    from quantkit.demo import resolve_builtin

    base = resolve_builtin("builtin:smollm2-135m-continuous")
    split = [x for x in a.gguf.split(",") if x], [x for x in a.hf.split(",") if x]
    built = build(base, Path(a.work), *split, a.group_size, a.samples, a.seq_len)
    rows = score(base, built, a.tokens)
    res = ROOT / "benchmarks"
    if a.update:
        rows = with_stored(rows, res / "quality.json")
    rows.sort(key=lambda r: (r["text"], -(r["bits"] or 0), r["variant"]))
    text = (f"Model builtin:smollm2-135m-continuous (base PPL {rows[0]['base_ppl']:.3f} on the eval text); "
            f"{rows[0]['tokens']} tokens per text; AWQ/GPTQ group {a.group_size}, calibration {a.samples} x "
            f"{a.seq_len} tokens of the builtin calibration text; GGUF presets without an imatrix.\n\n"
            + table(rows))
    (res / "quality.json").write_text(json.dumps(rows, indent=1, default=str))
    (res / "quality.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
