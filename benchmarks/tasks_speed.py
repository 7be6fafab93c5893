"""Task evaluation speed: quantkit's llama.cpp adapter vs lm-eval's own ``hf`` model on the dequantised GGUF.

    python3 benchmarks/tasks_speed.py [--type Q8_0] [--limit 50] [--threads 1] [--task examples/own-eval/own_eval.yaml]

Both score SmolLM2-135M's GGUF (built once by the tests' fixture, cached under ~/.cache/quantkit-tests) on the
same task, limit and shots through lm-eval's ``simple_evaluate``:

* quantkit: llama.cpp's ``task_lm`` (:class:`quantkit.engines.llama_cpp.GGUFLM`) -- llama.cpp's kernels on the
  quantised weights, KV prefix reuse;
* lm-eval ``hf``: ``HFLM(pretrained=<folder>, gguf_file=<file>)`` -- transformers dequantises the GGUF to fp32
  and runs it (what lm-eval users do today to score a GGUF without a llama.cpp server).

Prints load and scoring seconds, documents per second, generated tokens per second (generation tasks: the answers
re-tokenised with the base tokenizer) and the task score of each; writes benchmarks/results/tasks_speed.json
(``tasks_speed-<task>.json`` for another ``--task``), e.g. ``--task examples/own-gsm/own_gsm.yaml`` for the
generation task.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
RESULTS = ROOT / "benchmarks" / "results"

from quantkit.util import format_table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--type", default="Q8_0")
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--task", default=str(ROOT / "examples" / "own-eval" / "own_eval.yaml"))
    a = ap.parse_args()

    import fixtures_models as fm
    import torch
    from eval_fixtures import build_gguf_set, gguf_path
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    from quantkit import engines
    from quantkit.tasks import DEFAULT_MAX_LENGTH, _public, _run_tasks, resolve_tasks

    torch.set_num_threads(a.threads)
    hf = fm.build_smollm2_hf()
    gguf = gguf_path(build_gguf_set(hf), a.type)
    taskset = resolve_tasks(a.task)
    tok = AutoTokenizer.from_pretrained(hf)
    rows, out = [], {}

    def counting(lm):
        """Count the tokens of every generated answer (generate_until), as the base tokenizer splits them."""
        real = lm.generate_until
        lm.gen_tokens = 0

        def gen(requests, *a_, **kw):
            outs = real(requests, *a_, **kw)
            lm.gen_tokens += sum(len(tok(o, add_special_tokens=False).input_ids) for o in outs)
            return outs

        lm.generate_until = gen
        return lm

    t0 = time.perf_counter()
    lm = counting(engines.get("llama.cpp").task_lm(gguf, base_tokenizer=tok, base_path=hf,
                                                   max_length=DEFAULT_MAX_LENGTH, threads=a.threads))
    load = time.perf_counter() - t0
    scores, secs = _run_tasks(lm, taskset, a.limit, None)
    lm.close()
    out["quantkit llama.cpp"] = {"load_s": load, "eval_s": secs, "scores": scores, "gen_tokens": lm.gen_tokens}

    t0 = time.perf_counter()
    lm = HFLM(pretrained=str(gguf.parent), gguf_file=gguf.name, tokenizer=str(hf), device="cpu", dtype="float32",
              batch_size=1, max_length=DEFAULT_MAX_LENGTH)
    lm.engine = "lm-eval hf (dequantised)"
    lm = counting(lm)
    load = time.perf_counter() - t0
    scores, secs = _run_tasks(lm, taskset, a.limit, None)
    out["lm-eval hf (dequantised GGUF)"] = {"load_s": load, "eval_s": secs, "scores": scores,
                                            "gen_tokens": lm.gen_tokens}

    for name, r in out.items():
        for task, s in r["scores"].items():
            n_req = s["n"]
            rows.append([name, task, s["metric"], s["n"], f"{s['score']:.4f}", f"{r['load_s']:.1f}",
                         f"{r['eval_s']:.1f}", f"{n_req / r['eval_s']:.2f}",
                         f"{r['gen_tokens'] / r['eval_s']:.1f}" if r["gen_tokens"] else "-"])
    print(f"SmolLM2-135M {a.type}, limit {a.limit}, {a.threads} thread(s)")
    print(format_table(rows, ["engine", "task", "metric", "docs", "score", "load s", "score s", "docs/s",
                              "gen tok/s"]))
    a_, b_ = out.values()
    print(f"speed-up of the llama.cpp adapter: {b_['eval_s'] / a_['eval_s']:.2f}x")
    RESULTS.mkdir(parents=True, exist_ok=True)
    for r in out.values():
        r["scores"] = {t: _public(s) for t, s in r["scores"].items()}
    default = Path(a.task).resolve() == (ROOT / "examples" / "own-eval" / "own_eval.yaml").resolve()
    name = "tasks_speed.json" if default else f"tasks_speed-{Path(a.task).stem}.json"
    (RESULTS / name).write_text(json.dumps({"type": a.type, "limit": a.limit, "threads": a.threads, "task": a.task,
                                            "results": out}, indent=2))


if __name__ == "__main__":
    main()
