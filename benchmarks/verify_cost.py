"""What verify-on-build costs: verify seconds versus quantise seconds, on SmolLM2-135M.

    python3 benchmarks/verify_cost.py [--model DIR] [--samples 32] [--seq-len 512] [--threads N]
                                      [--only gguf|gptq]

For GGUF Q4_K_M and classic GPTQ 4-bit g64, in one process (as ``quantkit gguf|gptq`` runs them):

* ``quantise``: ``quantize_gguf`` (convert + quantise) / ``quantize_gptq`` (calibrate + pack + save) from a
  fresh output folder, with ``verify=False``;
* ``verify cold``: :func:`quantkit.verify.verify_artifact` with an empty quantkit cache, so the base's
  distribution on the verify tokens is computed too (what the first variant of a base pays);
* ``verify warm``: the same again with the base's distribution cached (every further variant, type or re-run).

Prints a markdown table (copied into ``benchmarks/verify_cost.md``) and writes
``benchmarks/results/verify_cost.json``. The load average at start and end is recorded: on a shared box both
sides slow down, not always by the same factor.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from quantkit.util import format_table  # noqa: E402


def timed(fn, *args, **kw):
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t0


def verify_twice(base: Path, artifact: Path, bits: int, sha: str, threads) -> tuple[dict, float, float]:
    from quantkit.verify import verify_artifact

    old = os.environ.get("QUANTKIT_CACHE")
    with tempfile.TemporaryDirectory(prefix="qk-verify-cache-") as cache:
        os.environ["QUANTKIT_CACHE"] = cache
        try:
            cold, t_cold = timed(verify_artifact, base, artifact, bits=bits, base_sha=sha, threads=threads)
            warm, t_warm = timed(verify_artifact, base, artifact, bits=bits, base_sha=sha, threads=threads)
        finally:
            if old is None:
                os.environ.pop("QUANTKIT_CACHE", None)
            else:
                os.environ["QUANTKIT_CACHE"] = old
    assert cold.passed and warm.passed, (cold, warm)
    return warm.to_json(), t_cold, t_warm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="HF folder (default: the SmolLM2-135M test fixture)")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", choices=["gguf", "gptq"])
    a = ap.parse_args()

    import fixtures_models as fm

    from quantkit.hub import resolve_model

    base = Path(a.model) if a.model else fm.build_smollm2_hf()
    src = resolve_model(str(base))
    load0 = os.getloadavg()
    rows, results = [], []
    with tempfile.TemporaryDirectory(prefix="qk-verify-cost-") as tmp:
        if a.only in (None, "gguf"):
            from quantkit.gguf import quantize_gguf

            res, t_q = timed(quantize_gguf, str(base), ["Q4_K_M"], Path(tmp) / "gguf", verify=False,
                             threads=a.threads)
            path = res.paths()[0]
            rec = res.manifest.artifact(res.artifacts[0])
            v, t_cold, t_warm = verify_twice(base, path, 4, src.sha, a.threads)
            results.append({"variant": "GGUF Q4_K_M", "quantise_s": t_q, "quantise_only_s": rec["seconds"],
                            "verify_cold_s": t_cold, "verify_warm_s": t_warm, "verify": v})
        if a.only in (None, "gptq"):
            from quantkit.gptq import quantize_gptq

            res, t_q = timed(quantize_gptq, str(base), bits=4, group_size=64, samples=a.samples,
                             seq_len=a.seq_len, out=Path(tmp) / "gptq", verify=False)
            v, t_cold, t_warm = verify_twice(base, res.folder, 4, src.sha, a.threads)
            results.append({"variant": f"GPTQ INT4 g64 classic ({a.samples}x{a.seq_len} calib)", "quantise_s": t_q,
                            "quantise_only_s": res.artifact["seconds"], "verify_cold_s": t_cold,
                            "verify_warm_s": t_warm, "verify": v})
    load1 = os.getloadavg()
    for r in results:
        rows.append([r["variant"], f"{r['quantise_s']:.1f}", f"{r['verify_cold_s']:.1f}",
                     f"{r['verify_cold_s'] / r['quantise_s'] * 100:.0f}%", f"{r['verify_warm_s']:.1f}",
                     f"{r['verify_warm_s'] / r['quantise_s'] * 100:.0f}%", f"{r['verify']['kld']:.4f}",
                     r["verify"]["tokens"]])
    headers = ["variant", "quantise s", "verify cold s", "cold/quantise", "verify warm s", "warm/quantise",
               "KLD", "tokens"]
    print(format_table(rows, headers))
    print(f"\nload average 1 min: {load0[0]:.1f} at start, {load1[0]:.1f} at end ({os.cpu_count()} cores)")
    out = ROOT / "benchmarks" / "results" / "verify_cost.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": str(base), "results": results, "loadavg_start": load0,
                               "loadavg_end": load1, "cpu_count": os.cpu_count()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
