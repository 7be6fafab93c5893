"""Evaluation speed and base-cache size vs llama.cpp's own perplexity tool, plus a SmolLM2-135M variant table.

    python3 benchmarks/eval_speed.py [--tokens 4096] [--ctx 512] [--threads 1] [--no-bench]

1. Builds (once, cached under benchmarks/results/) SmolLM2-135M Q8_0 / Q4_K_M / Q2_K GGUFs and an imatrix
   Q4_K_M with quantkit.gguf.quantize_gguf, and writes the evaluation text (quantkit's built-in) to a file.
2. ``quantkit.evaluate.evaluate`` on all of them (ctx 512, the first --tokens tokens).
3. llama.cpp's ``llama-perplexity`` on the same Q4_K_M GGUF, the same text file, the same ctx/chunks/threads:
   its decode throughput vs quantkit's scoring throughput for that GGUF (goal >= 0.9x).
4. ``llama-perplexity --kl-divergence-base`` from the F32 GGUF on the same text: the size of llama.cpp's
   full-vocabulary logit file vs quantkit's base cache (goal <= 1%), and llama.cpp's own KLD figure for Q4_K_M
   next to quantkit's (they score different positions: llama.cpp only the second half of each chunk).
5. ``quantkit.bench.bench`` on the variants and the base (tok/s for the variant table).

Prints tables and writes benchmarks/results/eval_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

from quantkit.util import format_table, human_size  # noqa: E402


def run_tool(args: list[str], threads: int) -> tuple[str, float]:
    from quantkit import llamacpp

    exe, env = llamacpp.tool("llama-perplexity")
    t0 = time.perf_counter()
    r = subprocess.run([str(exe), *args, "-t", str(threads), "-tb", str(threads)], env=env, capture_output=True,
                       text=True)
    wall = time.perf_counter() - t0
    out = r.stdout + r.stderr
    if r.returncode != 0:
        raise SystemExit(f"llama-perplexity failed ({r.returncode}):\n{out[-3000:]}")
    return out, wall


def parse_perf(out: str) -> dict:
    d = {}
    # llama-perplexity prints no perf summary: time its loop from its log timestamps (M.SS.mmm.uuu), from
    # "calculating perplexity over N chunks" to "Final estimate" (model load and tokenisation excluded).
    stamp = r"(\d+)\.(\d+)\.(\d+)\.(\d+) \w "

    def at(m):
        mi, se, ms, us = (int(x) for x in m.groups()[:4])
        return mi * 60 + se + ms / 1e3 + us / 1e6

    a = re.search(stamp + r"perplexity: calculating perplexity over (\d+) chunks, n_ctx=(\d+)", out)
    b = re.search(stamp + r"Final estimate", out)
    if a and b:
        d["chunks"], d["n_ctx"] = int(a.group(5)), int(a.group(6))
        d["loop_seconds"] = at(b) - at(a)
        d["tokens_per_second"] = d["chunks"] * d["n_ctx"] / d["loop_seconds"]
        d["scored_per_second"] = d["chunks"] * (d["n_ctx"] - 1 - d["n_ctx"] // 2) / d["loop_seconds"]
    m = re.search(r"Final estimate: PPL = ([\d.]+)", out)
    if m:
        d["ppl"] = float(m.group(1))
    m = re.search(r"Mean\s+KLD:\s+([\d.]+)", out)
    if m:
        d["kld_mean"] = float(m.group(1))
    m = re.search(r"99\.0%\s+KLD:\s+([\d.]+)", out)
    if m:
        d["kld_p99"] = float(m.group(1))
    m = re.search(r"Same top p:\s+([\d.]+)", out)
    if m:
        d["top1"] = float(m.group(1)) / 100
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads for every engine (1 is fastest on a busy 2-core box)")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--bench-prompt", type=int, default=128)
    ap.add_argument("--bench-gen", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("QUANTKIT_NO_PROGRESS", "1")
    RESULTS.mkdir(parents=True, exist_ok=True)

    from quantkit.bench import bench
    from quantkit.demo import build_smollm2_hf
    from quantkit.evaluate import evaluate
    from quantkit.gguf import quantize_gguf
    from quantkit.texts import builtin_eval_text

    base = build_smollm2_hf()
    plain = RESULTS / "smollm2-gguf"
    imx = RESULTS / "smollm2-gguf-imatrix"
    t0 = time.perf_counter()
    res = quantize_gguf(str(base), ["Q8_0", "Q4_K_M", "Q2_K"], plain, threads=args.threads)
    quantize_gguf(str(base), ["Q4_K_M"], imx, calibration="builtin", threads=args.threads)
    print(f"GGUFs ready ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    q4 = next(p for p in res.paths() if "Q4_K_M" in p.name)
    f32 = plain / res.manifest.data["intermediates"]["convert"]["path"]
    text_file = RESULTS / "eval-text.txt"
    text_file.write_text(builtin_eval_text(), encoding="utf-8")

    # -- quantkit eval ---------------------------------------------------------------------------------
    t0 = time.perf_counter()
    rep = evaluate(str(base), [str(plain), str(imx)], text=str(text_file), ctx=args.ctx, max_tokens=args.tokens,
                   threads=args.threads)
    eval_wall = time.perf_counter() - t0
    print(rep.table(), file=sys.stderr)
    windows = rep.context["windows"]
    rows = {r["name"] + (" +imatrix" if r["path"].startswith(str(imx)) else ""): r for r in rep.rows}
    q4row = next(r for r in rep.rows if r["path"] == str(q4))

    # -- llama-perplexity on the same GGUF / text / ctx / chunks ---------------------------------------
    common = ["-f", str(text_file), "-c", str(args.ctx), "--chunks", str(windows)]
    out_ppl, wall_ppl = run_tool(["-m", str(q4), *common], args.threads)
    lp = parse_perf(out_ppl)
    kld_file = RESULTS / "smollm2-f32.kld"
    out_base, wall_base = run_tool(["-m", str(f32), *common, "--kl-divergence-base", str(kld_file)], args.threads)
    out_kld, _ = run_tool(["-m", str(q4), "--kl-divergence-base", str(kld_file), "--kl-divergence",
                           "-c", str(args.ctx), "--chunks", str(windows)], args.threads)
    lk = parse_perf(out_kld)
    speed_ratio = q4row["tokens_per_second"] / lp["tokens_per_second"] if lp.get("tokens_per_second") else None
    cache_bytes = rep.context["base_cache"]["bytes"]
    kld_bytes = kld_file.stat().st_size
    vocab = 49152
    llama_scored = windows * (args.ctx - 1 - args.ctx // 2)
    ours_scored = q4row["tokens"] / q4row["seconds"]
    speed = [
        ["quantkit eval (llama-cpp-python, + KLD vs cache)", f"{q4row['tokens_per_second']:.0f}",
         f"{ours_scored:.0f}", f"{q4row['seconds']:.1f}", f"{q4row['ppl']:.4f}", f"{q4row['kld_mean']:.5f}",
         f"{q4row['top1'] * 100:.2f}%"],
        ["llama-perplexity (PPL)", f"{lp.get('tokens_per_second', 0):.0f}", f"{lp.get('scored_per_second', 0):.0f}",
         f"{lp.get('loop_seconds', 0):.1f}", f"{lp.get('ppl', float('nan')):.4f}", "", ""],
        ["llama-perplexity --kl-divergence", f"{lk.get('tokens_per_second', 0):.0f}",
         f"{lk.get('scored_per_second', 0):.0f}", f"{lk.get('loop_seconds', 0):.1f}",
         f"{lk.get('ppl', float('nan')):.4f}", f"{lk.get('kld_mean', float('nan')):.5f}",
         f"{lk.get('top1', float('nan')) * 100:.2f}%"],
    ]
    size = [
        ["quantkit base cache (top-64 + 64 tail samples)", human_size(cache_bytes), rep.context["tokens"],
         f"{cache_bytes / rep.context['tokens']:.0f}"],
        ["llama.cpp --kl-divergence-base (uint16 full vocab)", human_size(kld_bytes), llama_scored,
         f"{kld_bytes / llama_scored:.0f}"],
        ["full vocabulary float32 (same positions as quantkit)", human_size(rep.context["tokens"] * vocab * 4),
         rep.context["tokens"], vocab * 4],
    ]
    per_tok_ratio = (cache_bytes / rep.context["tokens"]) / (kld_bytes / llama_scored)

    # -- bench ------------------------------------------------------------------------------------------
    brep = None
    if not args.no_bench:
        brep = bench([str(plain), str(imx)], base=str(base), prompt_tokens=args.bench_prompt,
                     gen_tokens=args.bench_gen, repeats=args.repeats, threads=args.threads)
        print(brep.table(), file=sys.stderr)
    bench_by_path = {r["path"]: r for r in (brep.rows if brep else [])}
    variants = [["base (fp32, transformers)", human_size(rep.base["size"]), f"{rep.base['ppl']:.4f}", "", "", "",
                 f"{brep.base['tg_tps']:.1f}" if brep else ""]]
    for name, r in rows.items():
        b = bench_by_path.get(r["path"])
        variants.append([name, human_size(r["size"]), f"{r['ppl']:.4f}",
                         f"{r['delta_ppl']:+.4f} ({(r['ppl_ratio'] - 1) * 100:+.2f}%)", f"{r['kld_mean']:.5f}",
                         f"{r['top1'] * 100:.2f}%", f"{b['tg_tps']:.1f}" if b else ""])

    hw = rep.context["hardware"]
    print(f"\nSmolLM2-135M-Instruct, {rep.context['text']} ({rep.context['tokens']} scored tokens, "
          f"{windows} x {args.ctx}), {hw['cpu']}, {args.threads} thread(s)\n")
    print("Evaluation speed on the same Q4_K_M GGUF and text (model load excluded; decoded = tokens run through "
          "the model, scored = predictions that count):")
    print(format_table(speed, ["engine", "decoded tok/s", "scored tok/s", "loop s", "PPL", "KLD", "top-1"]))
    if speed_ratio:
        print(f"speed ratio quantkit / llama-perplexity: {speed_ratio:.2f}x decoded tokens/s (goal >= 0.9x), "
              f"{ours_scored / lp['scored_per_second']:.2f}x scored tokens/s (llama-perplexity scores only the "
              "second half of each window)")
    print("\nBase-distribution storage on this text:")
    print(format_table(size, ["store", "size", "positions", "bytes/position"]))
    print(f"quantkit cache / llama.cpp logit file: {cache_bytes / kld_bytes:.2%} of the file, "
          f"{per_tok_ratio:.2%} per scored position (goal <= 1%)")
    print("\nVariants (PPL/KLD/top-1 from quantkit eval; tok/s = generation speed from quantkit bench):")
    print(format_table(variants, ["variant", "size", "PPL", "dPPL", "KLD", "top-1", "tg tok/s"]))

    out = {"eval": rep.to_json(), "eval_wall_seconds": eval_wall, "llama_perplexity": {**lp, "wall_seconds": wall_ppl},
           "llama_kld": lk, "llama_kld_base_wall_seconds": wall_base, "speed_ratio": speed_ratio,
           "cache_bytes": cache_bytes, "llama_logits_bytes": kld_bytes, "cache_ratio": cache_bytes / kld_bytes,
           "cache_ratio_per_position": per_tok_ratio, "bench": brep.to_json() if brep else None,
           "tables": {"speed": speed, "size": size, "variants": variants}}
    (RESULTS / "eval_speed.json").write_text(json.dumps(out, indent=2, default=str))
    print(f"\nwrote {RESULTS / 'eval_speed.json'}")


if __name__ == "__main__":
    main()
