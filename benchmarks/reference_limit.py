"""`quantkit gguf` with verify on, under a RAM limit far below the base's fp32 size (issue 24's "done when").

    python3 benchmarks/reference_limit.py MODEL_DIR --limit-gb 3 [--types Q4_K_M] [--out DIR]

Runs the command in a cgroup (v1 ``memory`` controller, ``memory.limit_in_bytes``; needs root and a writable
``/sys/fs/cgroup/memory``), which is a real RAM limit: the kernel reclaims page cache under it and kills the
process when what it holds cannot be reclaimed. Samples the summed RSS of the process tree every 50 ms, reads the
cgroup's OOM-kill count, and prints the plan's RAM for the job beside the measured peak. Writes
``benchmarks/reference_limit.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gguf_pipeline import run_tree  # noqa: E402 - the process-tree RSS sampler

CG = Path("/sys/fs/cgroup/memory/quantkit-limit")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--limit-gb", type=float, default=3.0)
    ap.add_argument("--types", default="Q4_K_M")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "reference-limit"))
    args = ap.parse_args()
    from quantkit.plan import plan

    p = plan(args.model)
    limit = int(args.limit_gb * 1e9)
    CG.mkdir(exist_ok=True)
    (CG / "memory.limit_in_bytes").write_text(str(limit))
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    from quantkit.util import cache_home

    for sub in ("eval", "tokenize"):  # the reference is computed in the run, not taken from the cache
        shutil.rmtree(cache_home() / sub, ignore_errors=True)
    cmd = ["sh", "-c", f'echo $$ > {CG}/cgroup.procs && exec "$0" "$@"', sys.executable, "-m", "quantkit.cli",
           "gguf", args.model, "--types", args.types, "--out", str(out)]
    log_path = out.parent / f"{out.name}.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    r = run_tree(cmd, env={**os.environ, "QUANTKIT_NO_PROGRESS": "1"}, log=log_path)  # exits if the job fails
    log, wall, peak = log_path.read_text(errors="replace"), r["seconds"], int(r["peak_rss_mb"] * 1e6)
    oom = dict(line.split() for line in (CG / "memory.oom_control").read_text().splitlines())
    manifest = json.loads((out / "quantkit.json").read_text()) if (out / "quantkit.json").is_file() else {}
    verify = {k: v.get("verify") for k, v in manifest.get("artifacts", {}).items()}
    res = {"model": args.model, "params": p.params_total, "fp32_bytes": p.params_total * 4, "limit_bytes": limit,
           "plan_gguf_ram_bytes": p.needs["gguf"].ram_bytes, "plan_reference_bytes": p.reference.ram_bytes,
           "plan_reference_note": p.reference.note, "rc": 0, "seconds": round(wall, 1),
           "peak_tree_rss_bytes": peak, "oom_kills": int(oom.get("oom_kill", 0)), "verify": verify,
           "log_tail": log[-1500:]}
    (ROOT / "benchmarks" / "reference_limit.json").write_text(json.dumps(res, indent=2))
    print(json.dumps({k: v for k, v in res.items() if k != "log_tail"}, indent=2))
    print(log[-800:])


if __name__ == "__main__":
    main()
