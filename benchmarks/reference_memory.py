"""The base's reference: peak memory and time, whole model vs a layer at a time (quantkit/engines/hf_stream.py).

    python3 benchmarks/reference_memory.py [--models smollm2,10x1024,30x1024] [--tokens 256] [--threads 2]

Each measurement runs in a fresh child process: import torch + transformers (the runtime, its RSS taken then),
open the base (``HFSession``: the whole fp32 model; ``StreamedSession``: built without weights), score
``--tokens`` tokens in one window, and report the peak RSS (``VmHWM``) above the runtime and the wall time of open +
score. ``NxH`` is a synthetic random Llama of N layers and hidden H with SmolLM2's tokenizer
(``tests/fixtures_models.build_synthetic_llama``, bf16 safetensors). Prints a table and writes
``benchmarks/reference_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from quantkit.util import format_table  # noqa: E402

CHILD = textwrap.dedent("""
    import json, re, sys, time
    from pathlib import Path
    import accelerate, torch  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401
    from quantkit.engines.hf import HFSession
    from quantkit.engines.hf_stream import StreamedSession

    def rss(key):
        return int(re.search(key + r":\\\\s+(\\\\d+)", open("/proc/self/status").read()).group(1)) * 1024

    kind, path, tokens, threads = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    runtime = rss("VmRSS")
    t0 = time.perf_counter()
    s = (StreamedSession if kind == "streamed" else HFSession)(path, threads)
    logits = next(iter(s.score_windows([list(range(100, 100 + tokens))])))
    print(json.dumps({"runtime": runtime, "peak": rss("VmHWM"), "seconds": time.perf_counter() - t0,
                      "checksum": float(logits.double().abs().sum())}))
""")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,10x1024,30x1024")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import fixtures_models as fm

    rows = []
    for label in args.models.split(","):
        if label == "smollm2":
            path = fm.build_smollm2_hf()
        else:
            layers, hidden = (int(x) for x in label.split("x"))
            path = fm.build_synthetic_llama(layers, hidden)
        cfg = json.loads((path / "config.json").read_text())
        from quantkit.plan import plan

        p = plan(str(path))
        out = {}
        for kind in ("whole", "streamed"):
            r = subprocess.run([sys.executable, "-c", CHILD, kind, str(path), str(args.tokens), str(args.threads)],
                               capture_output=True, text=True, cwd=ROOT)
            line = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
            if not line:
                raise SystemExit(f"{label} {kind} failed:\n{r.stderr[-2000:]}")
            out[kind] = json.loads(line[-1])
        fp32 = p.params_total * 4
        same = abs(out["whole"]["checksum"] - out["streamed"]["checksum"]) <= 1e-6 * out["whole"]["checksum"]
        rows.append({"model": label, "params": p.params_total, "fp32_bytes": fp32, "layers": cfg["num_hidden_layers"],
                     "plan_reference_bytes": p.reference.ram_bytes, "same_logits": same,
                     **{f"{k}_{m}": out[k][m] for k in out for m in ("peak", "runtime", "seconds")}})
    table = format_table([[r["model"], f"{r['params'] / 1e6:.0f}M", f"{r['fp32_bytes'] / 1e9:.2f}",
                           f"{(r['peak_whole'] - r['runtime_whole']) / 1e9:.2f}",
                           f"{(r['peak_streamed'] - r['runtime_streamed']) / 1e9:.2f}",
                           f"{r['plan_reference_bytes'] / 1e9:.2f}",
                           f"{r['seconds_whole']:.1f}", f"{r['seconds_streamed']:.1f}",
                           "yes" if r["same_logits"] else "NO"] for r in rows],
                         ["model", "params", "fp32 GB", "whole: peak above runtime GB", "streamed GB",
                          "plan says GB", "whole s", "streamed s", "same logits"])
    print(table)
    data = {"rows": rows, "tokens": args.tokens, "threads": args.threads, "cpus": os.cpu_count(),
            "load_avg_at_end": os.getloadavg(), "table": table}
    (ROOT / "benchmarks" / "reference_memory.json").write_text(json.dumps(data, indent=2))


if __name__ == "__main__":
    main()
