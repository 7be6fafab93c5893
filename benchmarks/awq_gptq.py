"""quantkit awq|gptq versus calling the engine directly with the same settings, on SmolLM2-135M.

For each method x format, two fresh processes quantise the same model on the same calibration texts:

* ``quantkit``: ``python -m quantkit.cli <method> MODEL --format F --samples N --seq-len L --out DIR``
  (includes resolving the model, loading the calibration, hashing files and writing the manifest);
* ``direct``: ``benchmarks/_direct_engine.py`` -- GPTQModel.load/quantize/save or llm-compressor oneshot +
  save_pretrained with the same parameters, on the texts quantkit's calibration produced (written to JSON
  first, so both see identical samples). Direct llm-compressor AWQ needs the same CPU pin_memory patch.

Reported per run: wall seconds and peak RSS of the child process (``os.wait4``), their ratios
quantkit/direct (goal <= 1.05), and the perplexity of each result on the same held-out text (fixed,
non-overlapping windows over the start of quantkit's built-in eval text, computed with transformers on CPU).

    python3 benchmarks/awq_gptq.py [--model DIR] [--samples 8] [--seq-len 128] [--group-size 64] [--ppl-tokens 512]
                                   [--combos awq:classic,gptq:classic,awq:compressed-tensors,gptq:compressed-tensors]

Prints a table and writes benchmarks/results/awq_gptq.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from quantkit.util import format_table, human_size  # noqa: E402


def run_child(cmd: list[str], env: dict, log: Path) -> dict:
    """Run one child; wall seconds and its own peak RSS (bytes)."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=log.parent)
        _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{' '.join(cmd[:4])}... failed ({code}); log {log}:\n{tail}")
    return {"seconds": round(wall, 2), "peak_rss": ru.ru_maxrss * 1024}


def perplexity(folder: str, ids, window: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
    model.eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, ids.shape[1] - 1, window):
            chunk = ids[:, i:i + window]
            if chunk.shape[1] < 2:
                break
            out = model(chunk, labels=chunk)
            n = chunk.shape[1] - 1
            nll += out.loss.float().item() * n
            count += n
    del model
    return float(torch.exp(torch.tensor(nll / count)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="HF model folder (default: the SmolLM2-135M-Instruct test fixture)")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--group-size", type=int, default=64, help="64: SmolLM2's width 576 is not a multiple of 128")
    ap.add_argument("--ppl-tokens", type=int, default=512)
    ap.add_argument("--ppl-window", type=int, default=256)
    ap.add_argument("--combos", default="awq:classic,gptq:classic,awq:compressed-tensors,gptq:compressed-tensors")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", help="keep outputs here (default: a temporary folder)")
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    from quantkit import hfquant
    from quantkit.calibration import load_calibration
    from quantkit.texts import builtin_eval_text

    torch.set_num_threads(args.threads)
    if args.model:
        model = Path(args.model).resolve()
    else:
        import fixtures_models as fm

        model = fm.build_smollm2_hf()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="qk-bench-awq-gptq-"))
    work.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(model)
    cal = load_calibration(None, tokenizer=tok, samples=args.samples, seq_len=args.seq_len)
    texts_file = work / "calibration.json"
    texts_file.write_text(json.dumps(cal.texts))
    ids = tok(builtin_eval_text(), return_tensors="pt").input_ids[:, :args.ppl_tokens]

    env = dict(os.environ, QUANTKIT_NO_PROGRESS="1", OMP_NUM_THREADS=str(args.threads),
               TOKENIZERS_PARALLELISM="false")
    hfquant.engine_env_defaults()  # the same GPTQMODEL_* settings for both children
    for k in ("GPTQMODEL_CPU_WORKERS", "GPTQMODEL_TORCH_EXTENSIONS_DIR"):
        env[k] = os.environ[k]

    base_ppl = perplexity(str(model), ids, args.ppl_window)
    results = {"model": str(model), "samples": cal.samples, "seq_len": args.seq_len, "group_size": args.group_size,
               "calibration_tokens": cal.token_count, "ppl_tokens": int(ids.shape[1]),
               "ppl_window": args.ppl_window, "base_ppl": base_ppl, "threads": args.threads, "runs": []}
    rows = [["base (fp32)", "", "", "", "", "", "", f"{base_ppl:.3f}", ""]]
    for combo in args.combos.split(","):
        method, fmt = combo.split(":")
        qk_out, direct_out = work / f"qk-{method}-{fmt}", work / f"direct-{method}-{fmt}"
        direct = run_child([sys.executable, str(ROOT / "benchmarks" / "_direct_engine.py"), method, fmt,
                            str(model), str(texts_file), str(direct_out), str(args.seq_len),
                            str(args.group_size)],
                           env, work / f"direct-{method}-{fmt}.log")
        qk = run_child([sys.executable, "-m", "quantkit.cli", method, str(model), "--format", fmt,
                        "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--group-size",
                        str(args.group_size), "--out", str(qk_out)],
                       {**env, "PYTHONPATH": str(ROOT)}, work / f"qk-{method}-{fmt}.log")
        man = json.loads((qk_out / "quantkit.json").read_text())
        rec = next(iter(man["artifacts"].values()))
        assert rec["calibration"]["sha256"] == cal.sha256, "quantkit calibrated on other texts than direct"
        ppl_qk = perplexity(str(qk_out), ids, args.ppl_window)
        ppl_direct = perplexity(str(direct_out), ids, args.ppl_window)
        run = {"method": method, "format": fmt, "quantkit": {**qk, "ppl": ppl_qk, "size": rec["size"]},
               "direct": {**direct, "ppl": ppl_direct},
               "time_ratio": qk["seconds"] / direct["seconds"], "rss_ratio": qk["peak_rss"] / direct["peak_rss"]}
        results["runs"].append(run)
        rows.append([f"{method} {fmt}", f"{direct['seconds']:.1f}", f"{qk['seconds']:.1f}",
                     f"{run['time_ratio']:.3f}x", human_size(direct["peak_rss"]), human_size(qk["peak_rss"]),
                     f"{run['rss_ratio']:.3f}x", f"{ppl_direct:.3f}", f"{ppl_qk:.3f}"])
        print(format_table(rows[-1:], HEADERS), flush=True)

    print()
    print(format_table(rows, HEADERS))
    out = ROOT / "benchmarks" / "results" / "awq_gptq.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {out}  (outputs in {work})")


HEADERS = ["variant", "direct s", "quantkit s", "time ratio", "direct RSS", "quantkit RSS", "RSS ratio",
           "PPL direct", "PPL quantkit"]

if __name__ == "__main__":
    main()
