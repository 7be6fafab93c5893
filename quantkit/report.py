"""The comparison report of a recipe: one Markdown table and one PNG chart over every variant.

``quantkit-report.md`` lists each variant's size, bits per weight, KL divergence to the base, perplexity
change, same-top-token rate, speed, peak memory, the gains vs the base measured in the same engine (``tg x``,
``mem x``; the base's row first, an optional reference row labelled as such) and gate outcome;
``quantkit-report.png`` plots quality loss (mean KLD, or the perplexity increase when no KLD was measured)
against size, each point labelled with its tok/s, and, when benchmarked, generation tok/s against peak memory
with the base's point. Both are
written in the recipe's ``out`` folder and into each output folder (so each pushed repo carries them and its
card links to them).
"""

from __future__ import annotations

import os
from pathlib import Path

from quantkit.records import GATES
from quantkit.util import atomic_path, human_size, sha256_bytes

REPORT_MD = "quantkit-report.md"
REPORT_PNG = "quantkit-report.png"


def bench_rows(scores) -> tuple[list[dict], list[dict]]:
    """The distinct base rows (gains are relative to them) and reference rows of some :class:`BenchScore` s, in
    order of first appearance (one base per engine used; each measurement once, however many variants used it)."""
    bases: dict = {}
    refs: dict = {}
    for b in scores:
        if not b:
            continue
        for row, into in ((b.base, bases), (b.reference, refs)):
            if row:
                into.setdefault(row.get("measurement_id") or (row.get("name"), row.get("engine")), row)
    return list(bases.values()), list(refs.values())


def gain(x, dash: str = "-") -> str:
    """A gain as the report, card and run table show it: ``3.52x``, or ``dash`` when not measured."""
    return f"{x:.2f}x" if isinstance(x, (int, float)) and x else dash


def bench_notes(scores) -> list[str]:
    """Sentences on how speed and memory were measured, what the gains are relative to, the machine's load, and
    the benchmark's warnings (for the report and the card)."""
    scores = [b for b in scores if b]
    if not scores:
        return []
    b = scores[0]
    bases, refs = bench_rows(scores)
    hw = b.hardware or {}
    lines = [f"Speed and memory: `quantkit bench` with {b.engine or '?'} on {b.device or '?'}"
             + (f" ({hw.get('cpu')})" if hw.get("cpu") else "")
             + f", {b.threads} thread(s), a {b.prompt_tokens}-token prompt then {b.gen_tokens} generated tokens, "
             f"{b.repeats} timed repeats after a warm-up (mean ± stddev)."]
    if bases:
        lines.append("Gains (x) are relative to the base measured in the same engine ("
                     + "; ".join(f"{r.get('name')}, {r.get('label')}" for r in bases)
                     + "): tok/s variant / base, size and memory base / variant.")
    if refs:
        lines.append("The reference row is what you would run otherwise ("
                     + "; ".join(f"{r.get('name')}, {r.get('label')}" for r in refs)
                     + "): shown for comparison, no gain is computed against it.")
    methods = dict.fromkeys(m for m in [b.peak_memory_method for b in scores] + [r.get("peak_memory_method")
                                                                                  for r in bases + refs] if m)
    if methods:
        lines.append("Peak mem: " + "; ".join(methods) + ".")
    loads = [x.load_avg_1m for x in scores if x.load_avg_1m is not None]
    if loads:
        cpus = hw.get("cpu_count")
        busy = cpus and max(loads) > cpus  # as bench's own warning: more runnable work than cores
        lines.append(f"Load average (1 min) at the start of the benchmarks: {min(loads):.2f}"
                     + (f" to {max(loads):.2f}" if max(loads) - min(loads) >= 0.01 else "")
                     + (f" on {cpus} CPUs" if cpus else "")
                     + (": a busy machine, so the speeds are low and noisy" if busy else "") + ".")
    for r in bases:
        if r.get("measured_at"):
            lines.append(f"Base row measured {r['measured_at']}"
                         + (f" (load average {r['load_avg_1m']:.2f})" if r.get("load_avg_1m") is not None else "")
                         + (", reused from the bench cache" if r.get("cached") else "") + ".")
    lines += [f"Warning: {w}" for w in dict.fromkeys(w for x in scores for w in x.warnings or [])]
    return lines


def markdown(recipe, results, *, base_sha: str | None = None, image: str = REPORT_PNG) -> str:
    """The Markdown report (deterministic for the same inputs: no timestamps)."""
    e = recipe.eval
    gates = [g.rule(getattr(e, g.name)) for g in GATES if getattr(e, g.name) is not None]
    base_ppl = next((r.eval.base_ppl for r in results if r.eval and r.eval.base_ppl), None)
    scores = [r.bench for r in results if r.bench]
    lines = [
        f"# Quantisation report: {recipe.model_name}",
        "",
        f"Base: `{recipe.model}`" + (f" @ `{base_sha[:12]}`" if base_sha else "")
        + (f", perplexity {base_ppl:.4f}" if base_ppl else "") + f". Recipe: `{os.path.basename(recipe.path)}`.",
        f"Measured on {e.text} text, windows of {e.ctx} tokens, up to {e.max_tokens} tokens; KLD is the mean KL "
        "divergence base -> variant per token (lower is better); top-1 is how often the variant's most likely "
        "next token is the base's.",
        f"Gates: {', '.join(gates) if gates else 'none'}.",
        "",
        f"![quality vs size]({image})",
        "",
        "| variant | method | size | bits/weight | KLD | PPL change | top-1 | tok/s | tg x | peak mem | mem x "
        "| result |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    size = lambda x: human_size(x) if x else "-"  # noqa: E731
    bases, refs = bench_rows(scores)
    for row in bases + refs:
        base = row.get("role") != "reference"
        bpw = f"{row['bits_per_weight']:.2f}" if row.get("bits_per_weight") else "-"
        lines.append(f"| {row.get('name')} | {row.get('label')} | "
                     f"{size(row.get('size'))} | {bpw} | - | - | - | {_tps(row.get('tg_tps'), row.get('tg_tps_std'))} "
                     f"| {'1.00x' if base else '-'} | {size(row.get('peak_memory'))} | {'1.00x' if base else '-'} "
                     f"| {'base' if base else 'reference, no gain'} |")
    for r in results:
        ev, b = r.eval, r.bench
        kld = f"{ev.kld_mean:.5f}" if ev and ev.kld_mean is not None else "-"
        dppl = f"{ev.ppl_increase * 100:+.2f}%" if ev and ev.ppl_ratio is not None else "-"
        top1 = f"{ev.top1 * 100:.2f}%" if ev and ev.top1 is not None else "-"
        tps = _tps(b.tg_tps, b.tg_tps_std) if b and b.tg_tps else (f"{r.tokens_per_second:.1f}"
                                                                   if r.tokens_per_second else "-")
        status = {"gate failed": "**gate failed**", "failed": "**failed**"}.get(r.status, "passed")
        if r.status == "failed" and r.error:
            status += f" ({r.error[:60]})"
        bpw = f"{r.bits_per_weight:.2f}" if r.bits_per_weight else "-"
        lines.append(f"| {r.name} | {r.method} | {size(r.size)} | {bpw} | {kld} | {dppl} | {top1} | {tps} "
                     f"| {gain(b and b.tg_gain)} | {size(b and b.peak_memory)} "
                     f"| {gain(b and b.memory_gain)} | {status} |")
    if scores:
        lines += ["", "tok/s: generation speed.", ""] + [f"- {n}" for n in bench_notes(scores)]
    elif any(r.eval for r in results):
        lines += ["", "tok/s: scoring throughput during the evaluation (no benchmark was run)."]
    lines += _task_lines(recipe, results)
    lines += ["", "Made with `quantkit run` (quantkit-llm)."]
    return "\n".join(lines) + "\n"


def _task_lines(recipe, results) -> list[str]:
    """The task accuracy table (only when the tasks stage ran): task, shots, base, variant, recovery ± error."""
    from quantkit.tasks import RECOVERY_GATE as g

    scored = [(r, s) for r in results if r.tasks for s in r.tasks.tasks.values()]
    if not scored:
        return []
    limit = recipe.eval.min_recovery
    first = scored[0][1]
    lines = ["", "## Task accuracy", "",
             f"lm-evaluation-harness {first.lm_eval or '?'}"
             + (f", {first.limit:g} documents per task" if first.limit is not None else ", every document")
             + "; each variant scored by its own engine on the same requests as the base. Recovery is variant score "
               "/ base score (± standard error of the paired difference)"
             + (f"; gate: {g.rule(limit)}." if limit is not None else "."),
             "", "| task | metric | shots | base | variant | score | recovery |", "|---|---|---:|---:|---|---:|---:|"]
    for r, s in sorted(scored, key=lambda rs: (rs[1].task or "", rs[0].name)):
        miss = limit is not None and (s.recovery is None or not g.passes(s.recovery, limit))
        lines.append(f"| {s.task} | {s.metric} | {s.shots if s.shots is not None else '-'} | {s.base_shown} "
                     f"| {r.name} | {s.score_shown} | {s.recovery_shown}{' **below gate**' if miss else ''} |")
    return lines


def _tps(mean, sd) -> str:
    if not mean:
        return "-"
    return f"{mean:.1f}" + (f" ± {sd:.1f}" if sd else "")


def chart(path: str | os.PathLike, recipe, results) -> bool:
    """Write the PNG: quality loss (KLD, else PPL increase) against size, and, when benchmarked, generation
    speed against peak memory with the base's point; False when nothing was measured."""
    pts = [r for r in results if r.eval and r.size]
    if not pts:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benched = [r for r in results if r.bench and r.bench.tg_tps and r.bench.peak_memory]
    bases, refs = bench_rows([r.bench for r in benched])
    use_kld = all(r.eval.kld_mean is not None for r in pts)
    fig, axes = plt.subplots(1, 2 if benched else 1, figsize=(12.5 if benched else 7.5, 4.6), dpi=110,
                             squeeze=False)
    ax = axes[0][0]
    colors = {"gguf": "#1f77b4", "awq": "#d62728", "gptq": "#2ca02c"}
    sizes = [r.size for r in pts] + [b["size"] for b in bases if b.get("size")]
    scale, unit = (1e9, "GB") if max(sizes) > 2e9 else (1e6, "MB")
    for method in dict.fromkeys(r.method for r in pts):
        sel = [r for r in pts if r.method == method]
        xs = [r.size / scale for r in sel]
        ys = [max(r.eval.kld_mean, 1e-6) if use_kld else r.eval.ppl_increase * 100 for r in sel]
        ax.scatter(xs, ys, s=46, color=colors.get(method, "#555"), label=method.upper(), zorder=3,
                   edgecolors=["black" if r.status == "gate failed" else "none" for r in sel])
        for r, x, y in zip(sel, xs, ys):
            tps = r.tokens_per_second
            label = r.name + (f"\n{tps:.1f} tok/s" if tps and tps < 10 else f"\n{tps:.0f} tok/s" if tps else "")
            if r.status == "gate failed":
                label += "\n(gate failed)"
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    for b in bases:  # the base has no loss against itself: its size is a line
        if b.get("size"):
            ax.axvline(b["size"] / scale, color="#555", lw=1, ls=":", label=f"base {b.get('name')}")
    if use_kld:
        ax.set_yscale("log")
        ax.set_ylabel("mean KL divergence to base (log, lower is better)")
        if recipe.eval.max_kld:
            ax.axhline(recipe.eval.max_kld, color="#d62728", lw=1, ls="--", label=f"gate {recipe.eval.max_kld:g}")
    else:
        ax.set_ylabel("perplexity increase over base, % (lower is better)")
        if recipe.eval.max_ppl_increase is not None:
            ax.axhline(recipe.eval.max_ppl_increase * 100, color="#d62728", lw=1, ls="--", label="gate")
    ax.set_xlabel(f"size ({unit})")
    ax.set_title(f"{recipe.model_name}: quality vs size", fontsize=11)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_xlim(min(sizes) / scale * 0.85, max(sizes) / scale * 1.3)
    if benched:
        _speed_panel(axes[0][1], benched, bases, refs, colors)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)
    return True


def _speed_panel(ax, benched, bases, refs, colors) -> None:
    """Generation tok/s against peak memory: the variants, the base (same engine) and any reference row."""
    mems = [r.bench.peak_memory for r in benched] + [b["peak_memory"] for b in bases + refs if b.get("peak_memory")]
    scale, unit = (1e9, "GB") if max(mems) > 2e9 else (1e6, "MB")
    for r in benched:
        b = r.bench
        x, y = b.peak_memory / scale, b.tg_tps
        ax.errorbar(x, y, yerr=b.tg_tps_std or 0, fmt="o", ms=6, color=colors.get(r.method, "#555"), zorder=3)
        ax.annotate(r.name + (f"\n{b.tg_gain:.2f}x tok/s, {b.memory_gain:.2f}x mem" if b.tg_gain and b.memory_gain
                              else ""), (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    for row, marker, color in [(b, "*", "black") for b in bases] + [(b, "s", "#888") for b in refs]:
        if not (row.get("peak_memory") and row.get("tg_tps")):
            continue
        x, y = row["peak_memory"] / scale, row["tg_tps"]
        ax.errorbar(x, y, yerr=row.get("tg_tps_std") or 0, fmt=marker, ms=11 if marker == "*" else 7, color=color,
                    zorder=4)
        ax.annotate(f"{row.get('name')}\n({row.get('label')})", (x, y), textcoords="offset points",
                    xytext=(6, -14), fontsize=8)
    ax.set_xlabel(f"peak memory of the model in its engine ({unit})")
    ax.set_ylabel("generation tok/s (higher is better)")
    ax.set_title("speed vs memory, with the base (star)", fontsize=11)
    ax.set_xlim(0, max(mems) / scale * 1.35)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)


def write_report(folder: str | os.PathLike, recipe, results, *, base_sha: str | None = None,
                 link_prefix: str = "") -> dict:
    """Write ``quantkit-report.md`` + ``.png`` into ``folder``; returns their paths and the Markdown's sha256."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    png = folder / REPORT_PNG
    has_png = chart(png, recipe, results)
    md = markdown(recipe, results, base_sha=base_sha, image=link_prefix + REPORT_PNG)
    if not has_png:
        md = md.replace(f"![quality vs size]({link_prefix + REPORT_PNG})\n\n", "")
    with atomic_path(folder / REPORT_MD) as tmp:
        tmp.write_text(md)
    return {"markdown": str(folder / REPORT_MD), "image": str(png) if has_png else None,
            "sha256": sha256_bytes(md.encode())}
