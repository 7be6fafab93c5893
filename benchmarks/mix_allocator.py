"""Is the auto search limited by its allocator or by its model? Greedy vs exact allocation, predicted and measured.

    python3 benchmarks/mix_allocator.py [--model smollm2-continuous] [--budgets Q3_K_M Q4_K_M Q5_K_M]

``auto:`` allocates bytes greedily (error removed per byte, a tensor's upgrade skipped when it does not fit), which
is not optimal when single upgrades are large: on SmolLM2 the tied embedding Q5_1 -> Q8_0 is 8.8 MB, 8% of the
file. Here the same sensitivity table (the search's cached one: per-tensor proxy x measured per-kind scale x
per-layer gain) is also allocated **exactly** (dynamic programming over bytes, :data:`STEP`-byte units, a
multiple-choice knapsack: the least predicted KLD whose file fits the preset's). For every budget the preset, the
greedy mix and the exact mix are quantised with the same importance matrix and scored against the HF base on

* ``check``: the held-back half of the calibration samples (what the auto search's own check uses; 2048 tokens);
* ``eval`` / ``unseen``: the held-out texts of ``benchmarks/gguf_mix.py`` (4096 tokens, with standard errors).

So it shows (a) what the search's model predicts at its own optimum (an upper bound on what this model of the
errors can promise) and (b) whether optimising that model harder helps on text the search never saw.
Writes ``benchmarks/mix_allocator.md`` / ``.json``.
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

from gguf_mix import model_path  # noqa: E402  (benchmarks/gguf_mix.py: the same models and work folders)
from mix_exchange import _machine, _table  # noqa: E402

from quantkit import gguf_mix as gm  # noqa: E402
from quantkit.evaluate import evaluate  # noqa: E402
from quantkit.gguf import _load_calibration, _tokenizer, quantize_gguf  # noqa: E402
from quantkit.ggufio import quantize_file  # noqa: E402
from quantkit.texts import held_out_texts  # noqa: E402
from quantkit.util import format_table  # noqa: E402

STEP = 256  # bytes per unit of the exact allocation (each tensor's extra bytes rounded up to it)
TOKENS = 4096


def exact_allocate(table: dict, budget: int, header: int, align: int, step: int = STEP) -> tuple[dict, int]:
    """``({tensor: type}, file bytes)`` minimising the predicted KLD with the file within ``budget``."""
    import numpy as np

    opts = gm.pareto_options(table, align)  # per tensor [(bytes, error, type)], cheapest first
    floor = header + sum(o[0][0] for o in opts.values())
    cap = (budget - floor) // step
    if cap < 0:
        raise SystemExit(f"no mix fits in {budget:,} bytes")
    best = np.zeros(cap + 1)  # least added error with at most u units of extra bytes
    args = {}
    for n, o in opts.items():
        if len(o) == 1:
            continue
        new, arg = best.copy(), np.zeros(cap + 1, dtype=np.int8)
        for i in range(1, len(o)):
            u = -(-(o[i][0] - o[0][0]) // step)
            if u > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[u:] = best[:cap + 1 - u] + (o[i][1] - o[0][1])
            better = cand < new
            new[better], arg[better] = cand[better], i
        best, args[n] = new, arg
    u, assign, size = cap, {}, header
    for n in reversed(list(opts)):
        o = opts[n]
        i = int(args[n][u]) if n in args else 0
        assign[n] = o[i][2]
        size += o[i][0]
        u -= -(-(o[i][0] - o[0][0]) // step) if i else 0
    return assign, size


def run(name: str, budgets: list[str], work: Path) -> dict:
    base = model_path(name)
    res = quantize_gguf(str(base), [t for b in budgets for t in (b, f"auto:{b}")], work / name,
                        calibration="builtin", threads=2)
    arts = res.manifest.artifacts
    tok = _tokenizer(base)
    _, check_text, _ = gm.split_calibration(_load_calibration("builtin", tok).texts,
                                            count=lambda t: len(tok(t, add_special_tokens=False).input_ids))
    inter = res.folder / res.manifest.data["intermediates"]["convert"]["path"]
    scratch = res.folder / ".quantkit-work" / "allocator"
    scratch.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    out, files = {}, []
    for i, b in enumerate(budgets):
        rec = arts[res.artifacts[2 * i + 1]]["mix"]
        table = _table(rec)
        # the preset quantised here as the mixes are (same call, same metadata: the header names the imatrix file)
        preset = scratch / f"preset-{b}.gguf"
        quantize_file(inter, preset, b, threads=2, imatrix=res.imatrix)
        budget = preset.stat().st_size
        sizes, header, align = gm.tensor_bytes(preset)
        greedy, _ = gm.allocate(table, budget, header, align)
        exact, _ = exact_allocate(table, budget, header, align)
        row = {"budget_bytes": budget, "auto_fallback": rec["fallback"],
               "predicted": {"preset": gm.predicted_kld(table, {n: t for n, (t, _b) in sizes.items()}),
                             "greedy": gm.predicted_kld(table, greedy), "exact": gm.predicted_kld(table, exact)},
               "exact_tensor_types": exact, "files": {}}
        for kind, assign in (("greedy", greedy), ("exact", exact)):
            f = scratch / f"{kind}-{b}.gguf"
            quantize_file(inter, f, b, threads=2, imatrix=res.imatrix, overrides=gm.overrides(assign))
            if f.stat().st_size > budget:
                raise SystemExit(f"{kind} mix at {b}: {f.stat().st_size:,} bytes > {budget:,}")
            row["files"][kind] = f.stat().st_size
        files += [preset, scratch / f"greedy-{b}.gguf", scratch / f"exact-{b}.gguf"]
        out[b] = row
    measured = {"check": [(k, None) for k in gm._kld(base, files, check_text, 2)]}
    for label, text, _ in held_out_texts():
        rep = evaluate(str(base), [str(f) for f in files], text=text, max_tokens=TOKENS, write_manifest=False,
                       threads=2)
        measured[label] = [(r["kld_mean"], r.get("kld_se")) for r in rep.rows]
    for i, b in enumerate(budgets):
        out[b]["measured"] = {text: dict(zip(("preset", "greedy", "exact"), vals[3 * i:3 * i + 3]))
                              for text, vals in measured.items()}
    for f in files:
        f.unlink()
    return {"model": name, "budgets": out, "step_bytes": STEP, "tokens": TOKENS,
            "seconds": round(time.perf_counter() - t0, 1),
            "provenance": f"Provenance: benchmarks/mix_allocator.py --model {name} --budgets {' '.join(budgets)}, "
                          f"{time.strftime('%Y-%m-%d')}, {_machine()}."}


def report(r: dict) -> str:
    rows = []
    for b, v in r["budgets"].items():
        p = v["predicted"]
        for kind in ("greedy", "exact"):
            cells = [b, kind, f"{p[kind]:.5f} ({p[kind] / p['preset']:.3f})"]
            for text in ("check", "eval", "unseen"):
                m = v["measured"][text]
                k, se = m[kind]
                kp, sep = m["preset"]
                cells.append(f"{k / kp:.3f}" + (f" ± {k / kp * ((se / k) ** 2 + (sep / kp) ** 2) ** 0.5:.3f}"
                                                  if se and sep else ""))
            rows.append(cells)
    return (f"# Greedy vs exact allocation of the auto search's model ({r['model']})\n\n"
            "Predicted: the search's model (ratio to its prediction of the preset). Measured: KLD ratio to the "
            f"preset (same importance matrix) on the held-back calibration half (2048 tokens) and on the held-out "
            f"texts ({r['tokens']} tokens, ± from both means' standard errors).\n\n```\n"
            + format_table(rows, ["budget", "allocation", "predicted KLD", "check", "eval", "unseen"]) + "\n```\n"
            + "".join(f"\n{r[k]}\n" for k in ("provenance", "reading") if r.get(k)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-continuous")
    ap.add_argument("--budgets", nargs="+", default=["Q3_K_M", "Q4_K_M", "Q5_K_M"])
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "quantkit-bench" / "gguf_mix"))
    a = ap.parse_args(argv)
    r = run(a.model, a.budgets, Path(a.work))
    here = Path(__file__).with_suffix("")
    here.with_suffix(".json").write_text(json.dumps(r, indent=2) + "\n")
    here.with_suffix(".md").write_text(report(r))
    print(report(r))


if __name__ == "__main__":
    main()
