"""quantkit's measured per-tensor mixes (``auto:PRESET``) versus llama.cpp's presets at the same file size.

    python3 benchmarks/gguf_mix.py [--models smollm2-continuous,smollm2,qwen2]
                                    [--budgets Q3_K_M,Q4_K_M,Q5_K_M,6.0bpw] [--tokens 4096]

For each model, one ``quantize_gguf`` run makes every preset and its ``auto:`` mix with the same importance
matrix (builtin calibration text: CPython's pydoc topics); then every file is scored against the HF base on
the *held-out* builtin eval text (Python FAQ; never the calibration text) and on prose of another kind that
quantkit never sees (``quantkit.texts.unseen_text``: CPython's licence history + IDLE's release history): mean
KLD (± standard error), PPL change, top-1 agreement. ``search s`` is the wall time of the auto variant
(sensitivity table + allocation + the calibration-text check); the table is built once per model and re-used by
the other budgets, so the first budget's time includes it. A size budget (``6.0bpw``, ``100MB``) is compared with
the preset its search chose as comparator (the largest whose file fits; the budget column names it), whose
file may be smaller than the budget. Models: the continuous SmolLM2-135M
(``builtin:smollm2-135m-continuous``: the model of quality claims), the gridded builtin SmolLM2 (weights on a
Q4_1 grid, which flatters mixes; kept for comparison) and a tiny random 2-layer Qwen2 fixture
(tests/fixtures_models.py; random weights, so its numbers say only that the machinery works there).
Prints a table and writes ``benchmarks/gguf_mix.json`` and ``.md``.
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

from quantkit.evaluate import evaluate  # noqa: E402
from quantkit.formats import MIX_PRESETS  # noqa: E402
from quantkit.gguf import quantize_gguf  # noqa: E402
from quantkit.texts import held_out_texts  # noqa: E402
from quantkit.util import format_table, human_size  # noqa: E402

HEADERS = ["model", "text", "budget", "preset size", "auto size", "KLD preset", "KLD auto", "KLD ratio", "ΔPPL preset",
           "ΔPPL auto", "top-1 preset", "top-1 auto", "search s", "fallback"]


def model_path(name: str) -> Path:
    if name == "smollm2":
        from quantkit.demo import demo_model

        return demo_model()
    if name == "smollm2-continuous":
        from quantkit.demo import resolve_builtin

        return resolve_builtin("builtin:smollm2-135m-continuous")
    from fixtures_models import build_tiny

    return build_tiny(name)


def run(name: str, budgets: list[str], work: Path, tokens: int) -> list[dict]:
    base = model_path(name)
    out = work / name
    types = [t for b in budgets for t in ((b, f"auto:{b}") if b in MIX_PRESETS else (f"auto:{b}",))]
    t0 = time.perf_counter()
    res = quantize_gguf(str(base), types, out, calibration="builtin", threads=2)
    arts = dict(zip(types, res.artifacts))
    # a size budget (auto:6.0bpw) is compared with the preset its search chose: the largest that fits
    chosen = {b: res.manifest.artifacts[arts[f"auto:{b}"]]["mix"]["preset"] for b in budgets if b not in MIX_PRESETS}
    extra = sorted({p for p in chosen.values() if p and p not in types})
    if extra:
        res = quantize_gguf(str(base), types + extra, out, calibration="builtin", threads=2)
        arts = dict(zip(types + extra, res.artifacts))
    total = time.perf_counter() - t0
    rows = []
    for label, text, text_name in held_out_texts():
        rows += _score(name, base, res, arts, budgets, label, text, text_name, tokens, total)
    return rows


def _score(name, base, res, arts, budgets, label, text, text_name, tokens, total) -> list[dict]:
    rep = evaluate(str(base), [str(p) for p in res.paths()], text=text, max_tokens=tokens, write_manifest=False)
    by_path = {Path(r["path"]).name: r for r in rep.rows}
    rows = []
    for b in budgets:
        a = res.manifest.artifacts[arts[f"auto:{b}"]]
        comparator = b if b in MIX_PRESETS else a["mix"]["preset"]
        if comparator is None:  # no preset fits the budget: nothing to compare with
            continue
        p = res.manifest.artifacts[arts[comparator]]
        rp, ra = by_path[p["path"]], by_path[a["path"]]
        mix = a["mix"]
        rows.append({
            "model": name, "text": label, "budget": b if b in MIX_PRESETS else f"{b} ({comparator})",
            "preset_size": p["size"], "auto_size": a["size"],
            "kld_preset": rp["kld_mean"], "kld_preset_se": rp.get("kld_se"), "kld_auto": ra["kld_mean"],
            "kld_auto_se": ra.get("kld_se"), "kld_ratio": ra["kld_mean"] / rp["kld_mean"],
            "ppl_change_preset": rp["ppl_ratio"] - 1, "ppl_change_auto": ra["ppl_ratio"] - 1,
            "top1_preset": rp["top1"], "top1_auto": ra["top1"], "search_seconds": mix["search"]["seconds"],
            "sensitivity_seconds": mix["search"]["sensitivity_seconds"], "fallback": mix["fallback"],
            "check": mix["search"]["check"], "tensor_types": mix["tensor_types"], "total_seconds": total,
            "eval_tokens": rep.context["tokens"], "eval_text": text_name,
            # the unit the search cost is stated in: one quantisation of the preset plus one scoring of it
            "preset_quantize_seconds": p["seconds"], "preset_eval_seconds": rp.get("seconds"),
        })
    return rows


def _pm(v, se, digits=4) -> str:
    return f"{v:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "")


def ratio_se(r: dict) -> float | None:
    """Standard error of KLD auto / KLD preset from the two means' errors (independent-error approximation:
    the two files are scored on the same tokens, so it overstates the error of a correlated pair)."""
    a, b, sa, sb = r["kld_auto"], r["kld_preset"], r.get("kld_auto_se"), r.get("kld_preset_se")
    if sa is None or sb is None:
        return None
    return (a / b) * ((sa / a) ** 2 + (sb / b) ** 2) ** 0.5


def table(rows: list[dict]) -> str:
    return format_table([[r["model"], r.get("text", "eval"), r["budget"], human_size(r["preset_size"]),
                          human_size(r["auto_size"]),
                          _pm(r["kld_preset"], r.get("kld_preset_se")), _pm(r["kld_auto"], r.get("kld_auto_se")),
                          _pm(r["kld_ratio"], ratio_se(r), 3),
                          f"{r['ppl_change_preset']:+.2%}", f"{r['ppl_change_auto']:+.2%}",
                          f"{r['top1_preset']:.3f}", f"{r['top1_auto']:.3f}", f"{r['search_seconds']:.0f}",
                          "yes" if r["fallback"] else "no"] for r in rows], HEADERS)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-continuous,smollm2,qwen2")
    ap.add_argument("--budgets", default="Q3_K_M,Q4_K_M,Q5_K_M,6.0bpw",
                    help="presets, or sizes (6.0bpw, 100MB) compared with the largest preset that fits")
    ap.add_argument("--tokens", type=int, default=4096, help="eval tokens (held-out builtin eval text)")
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "quantkit-bench" / "gguf_mix"))
    a = ap.parse_args(argv)
    res = ROOT / "benchmarks"
    models = [m.strip() for m in a.models.split(",")]
    old = res / "gguf_mix.json"  # rows of models not run now are kept
    rows = [r for r in json.loads(old.read_text()) if r["model"] not in models] if old.is_file() else []
    for m in models:  # results written after each model
        rows += run(m, a.budgets.split(","), Path(a.work), a.tokens)
        text = table(rows)
        (res / "gguf_mix.json").write_text(json.dumps(rows, indent=1, default=str))
        (res / "gguf_mix.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
