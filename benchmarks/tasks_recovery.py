"""Task accuracy and recovery of each format on the continuous SmolLM2-135M, in one run.

    python3 benchmarks/tasks_recovery.py [--gguf Q8_0,Q4_K_M,Q2_K] [--hf gptq:classic,awq:classic]
                                         [--tasks own_eval,own_gsm] [--limit N] [--group-size 64]

Model: ``builtin:smollm2-135m-continuous`` (no grid its weights already sit on). Variants: GGUF presets
(``quantize_gguf``, no imatrix) in llama.cpp and 4-bit AWQ/GPTQ (``quantize_awq`` / ``quantize_gptq`` at their
defaults but group 64 and 32 x 256 calibration tokens, as ``benchmarks/quality.py`` makes them) in transformers,
against the base in transformers. Tasks: the repo's own multiple-choice eval (``examples/own-eval``: 50
questions, 0-shot, acc_norm) and generation task (``examples/own-gsm``: 50 word problems, 4-shot, exact match),
through ``quantkit.tasks.eval_tasks`` (lm-eval with quantkit's engine adapters). Reported per variant and task:
score ± standard error and recovery (variant / base) ± its paired error. Writes ``benchmarks/tasks_recovery.json``
and ``.md``.
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
sys.path.insert(0, str(ROOT / "benchmarks"))

TASKS = {"own_eval": ROOT / "examples" / "own-eval" / "own_eval.yaml",
         "own_gsm": ROOT / "examples" / "own-gsm" / "own_gsm.yaml"}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", default="Q8_0,Q4_K_M,Q2_K")
    ap.add_argument("--hf", default="gptq:classic,awq:classic")
    ap.add_argument("--tasks", default="own_eval,own_gsm")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "quantkit-bench" / "tasks_recovery"))
    a = ap.parse_args(argv)
    from quality import build

    from quantkit.demo import resolve_builtin
    from quantkit.tasks import eval_tasks

    base = resolve_builtin("builtin:smollm2-135m-continuous")
    built = build(base, Path(a.work), [x for x in a.gguf.split(",") if x], [x for x in a.hf.split(",") if x],
                  a.group_size, a.samples, a.seq_len)
    paths = [b["path"] for b in built]
    out, text = [], []
    for task in a.tasks.split(","):
        t0 = time.perf_counter()
        rep = eval_tasks(str(base), paths, str(TASKS[task]), limit=a.limit, threads=a.threads,
                         write_manifest=False)
        secs = time.perf_counter() - t0
        out.append({"task": task, "seconds": round(secs, 1), **rep.to_json()})
        text.append(f"## {task} ({secs:.0f} s)\n\n{rep.table().replace(str(ROOT) + os.sep, '')}\n")
    head = (f"Model builtin:smollm2-135m-continuous; GGUF presets without an imatrix (llama.cpp); AWQ/GPTQ 4-bit "
            f"group {a.group_size}, calibration {a.samples} x {a.seq_len} tokens of the builtin calibration text "
            f"(transformers); base in transformers; limit {a.limit or 'none'}.\n\n")
    (ROOT / "benchmarks" / "tasks_recovery.json").write_text(json.dumps(out, indent=1, default=str))
    (ROOT / "benchmarks" / "tasks_recovery.md").write_text(head + "\n".join(text))
    print(head + "\n".join(text))


if __name__ == "__main__":
    main()
