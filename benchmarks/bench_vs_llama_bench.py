"""``quantkit bench`` against llama.cpp's own ``llama-bench`` (GGUF) and a plain transformers loop (HF formats).

    python3 benchmarks/bench_vs_llama_bench.py [--threads 1] [--prompt 128] [--gen 32] [--repeats 3]

1. Builds (once, cached under benchmarks/results/smollm2-gguf/, shared with eval_speed.py) SmolLM2-135M Q8_0 and
   Q4_K_M GGUFs with quantkit.gguf.quantize_gguf; the F32 intermediate next to them is the llama.cpp base.
2. For the F32, Q8_0 and Q4_K_M GGUFs: ``quantkit.bench.bench`` (one process per model, warm-up + --repeats
   timed passes) and ``llama-bench`` on the same file, threads and token counts: prompt processing ``-p P -n 0``,
   generation ``-p 0 -n G -d P`` (G tokens on top of a P-token context, as quantkit generates after its prompt).
   Ratio quantkit / llama-bench for each (goal: within 5%).
3. For the HF base (fp32 safetensors): ``quantkit.bench.bench`` in transformers vs a plain loop a user would
   write (one forward pass of the prompt; ``model.generate(max_new_tokens=G, min_new_tokens=G)`` greedy, its
   generation rate = G / (generate time - prompt time)), in a fresh process, same threads.

Writes benchmarks/bench_vs_llama_bench.md (the table) and benchmarks/bench_vs_llama_bench.json, with the CPU,
threads and the 1-minute load average before and after (speeds on a shared machine are only comparable when the
load is low).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
OUT_MD = ROOT / "benchmarks" / "bench_vs_llama_bench.md"
OUT_JSON = ROOT / "benchmarks" / "bench_vs_llama_bench.json"

from quantkit.util import format_table  # noqa: E402

PLAIN_LOOP = r'''
import json, statistics, sys, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path, P, G, R, T = sys.argv[1], *map(int, sys.argv[2:6])
torch.set_num_threads(T)
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
ids = torch.tensor([[(1000 + 7 * i) % len(tok) for i in range(P)]])
def once(g):
    with torch.inference_mode():
        t0 = time.perf_counter(); model(input_ids=ids); t1 = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=g, min_new_tokens=g,
                       do_sample=False, pad_token_id=tok.eos_token_id or 0)
        t2 = time.perf_counter()
    return t1 - t0, (t2 - t1) - (t1 - t0)
once(4)
pp, tg = [], []
for _ in range(R):
    a, b = once(G)
    pp.append(P / a); tg.append(G / b)
print(json.dumps({"pp": statistics.fmean(pp), "pp_std": statistics.stdev(pp) if R > 1 else 0.0,
                  "tg": statistics.fmean(tg), "tg_std": statistics.stdev(tg) if R > 1 else 0.0}))
'''


def llama_bench(path: Path, args, prompt: int, gen: int, depth: int) -> dict:
    from quantkit import llamacpp

    exe, env = llamacpp.tool("llama-bench")
    cmd = [str(exe), "-m", str(path), "-p", str(prompt), "-n", str(gen), "-d", str(depth), "-t", str(args.threads),
           "-r", str(args.repeats), "-o", "json", *args.llama_bench_arg]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"llama-bench failed ({r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}")
    (entry,) = [e for e in json.loads(r.stdout) if e["n_prompt"] == prompt and e["n_gen"] == gen]
    return {"tps": entry["avg_ts"], "std": entry["stddev_ts"], "cmd": " ".join(cmd[1:]),
            "flash_attn": entry.get("flash_attn"), "n_batch": entry.get("n_batch"), "n_ubatch": entry.get("n_ubatch")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", help="an fp32 HF folder instead of the built-in SmolLM2-135M-Instruct (smoke tests)")
    ap.add_argument("--llama-bench-arg", action="append", default=[],
                    help="extra llama-bench argument (repeatable), e.g. --llama-bench-arg=--repack --llama-bench-arg=0")
    args = ap.parse_args()
    os.environ.setdefault("QUANTKIT_NO_PROGRESS", "1")
    RESULTS.mkdir(parents=True, exist_ok=True)

    from quantkit.bench import bench
    from quantkit.demo import build_smollm2_hf
    from quantkit.evaluate import hardware
    from quantkit.gguf import quantize_gguf

    load_before = os.getloadavg()[0]
    base = Path(args.model).resolve() if args.model else build_smollm2_hf()
    res = quantize_gguf(str(base), ["Q8_0", "Q4_K_M"], RESULTS / ("smollm2-gguf" if not args.model else base.name),
                        threads=2)
    ggufs = [res.folder / res.manifest.data["intermediates"]["convert"]["path"]] + \
            [p for p in res.paths() if "Q8_0" in p.name or "Q4_K_M" in p.name]
    kw = dict(prompt_tokens=args.prompt, gen_tokens=args.gen, repeats=args.repeats, threads=args.threads,
              base=False, write_manifest=False)

    rows, records = [], []
    for g in ggufs:
        q = bench([str(g)], **kw).rows[0]
        lp = llama_bench(g, args, args.prompt, 0, 0)
        lt = llama_bench(g, args, 0, args.gen, args.prompt)
        rec = {"model": g.name, "engine": "llama.cpp", "quantkit_pp": q["pp_tps"], "quantkit_pp_std": q["pp_tps_std"],
               "quantkit_tg": q["tg_tps"], "quantkit_tg_std": q["tg_tps_std"], "ref": "llama-bench",
               "ref_pp": lp["tps"], "ref_pp_std": lp["std"], "ref_tg": lt["tps"], "ref_tg_std": lt["std"],
               "pp_ratio": q["pp_tps"] / lp["tps"], "tg_ratio": q["tg_tps"] / lt["tps"],
               "peak_memory": q["peak_memory"], "llama_bench": [lp, lt]}
        records.append(rec)
        print(f"{g.name}: pp {rec['pp_ratio']:.3f}x, tg {rec['tg_ratio']:.3f}x of llama-bench", file=sys.stderr)

    q = bench([str(base)], **kw).rows[0]
    r = subprocess.run([sys.executable, "-c", PLAIN_LOOP, str(base), str(args.prompt), str(args.gen),
                        str(args.repeats), str(args.threads)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"plain transformers loop failed:\n{r.stderr[-3000:]}")
    plain = json.loads(r.stdout.strip().splitlines()[-1])
    records.append({"model": f"{base.name} (safetensors fp32)", "engine": "transformers", "quantkit_pp": q["pp_tps"],
                    "quantkit_pp_std": q["pp_tps_std"], "quantkit_tg": q["tg_tps"], "quantkit_tg_std": q["tg_tps_std"],
                    "ref": "plain generate loop", "ref_pp": plain["pp"], "ref_pp_std": plain["pp_std"],
                    "ref_tg": plain["tg"], "ref_tg_std": plain["tg_std"], "pp_ratio": q["pp_tps"] / plain["pp"],
                    "tg_ratio": q["tg_tps"] / plain["tg"], "peak_memory": q["peak_memory"]})
    load_after = os.getloadavg()[0]

    for rec in records:
        rows.append([rec["model"], rec["engine"], f"{rec['quantkit_pp']:.1f} ± {rec['quantkit_pp_std']:.1f}",
                     f"{rec['ref_pp']:.1f} ± {rec['ref_pp_std']:.1f}", f"{rec['pp_ratio']:.3f}",
                     f"{rec['quantkit_tg']:.1f} ± {rec['quantkit_tg_std']:.1f}",
                     f"{rec['ref_tg']:.1f} ± {rec['ref_tg_std']:.1f}", f"{rec['tg_ratio']:.3f}", rec["ref"]])
    hw = hardware(args.threads)
    head = (f"{base.name}; prompt {args.prompt} tokens, generate {args.gen} tokens after it, "
            f"{args.repeats} repeats after a warm-up; {hw['cpu']}, {hw['cpu_count']} CPUs, {args.threads} thread(s); "
            f"1-min load average {load_before:.2f} before, {load_after:.2f} after.")
    table = format_table(rows, ["model", "engine", "quantkit pp tok/s", "reference pp tok/s", "pp ratio",
                                "quantkit tg tok/s", "reference tg tok/s", "tg ratio", "reference"])
    within = [r for r in records if r["engine"] == "llama.cpp"]
    worst = max(max(abs(r["pp_ratio"] - 1), abs(r["tg_ratio"] - 1)) for r in within)
    verdict = (f"Largest quantkit / llama-bench deviation on the GGUFs: {worst * 100:.1f}% "
               f"({'within' if worst <= 0.05 else 'outside'} the 5% goal).")
    md = (f"# quantkit bench vs llama-bench and a plain transformers loop\n\n"
          f"Made by `python3 benchmarks/bench_vs_llama_bench.py --threads {args.threads} --prompt {args.prompt} "
          f"--gen {args.gen} --repeats {args.repeats}"
          f"{''.join(' --llama-bench-arg=' + a for a in args.llama_bench_arg)}` on "
          f"{time.strftime('%Y-%m-%d', time.gmtime())}.\n\n{head}\n\n"
          f"```\n{table}\n```\n\n{verdict}\n")
    OUT_MD.write_text(md)
    OUT_JSON.write_text(json.dumps({"context": {"prompt_tokens": args.prompt, "gen_tokens": args.gen,
                                                "repeats": args.repeats, "threads": args.threads, "hardware": hw,
                                                "load_avg_1m_before": load_before, "load_avg_1m_after": load_after},
                                    "results": records, "max_deviation_gguf": worst}, indent=2, default=str) + "\n")
    print(md)
    print(f"wrote {OUT_MD} and {OUT_JSON}", file=sys.stderr)


if __name__ == "__main__":
    main()
