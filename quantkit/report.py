"""The comparison report of a recipe: one Markdown table and one PNG chart over every variant.

``quantkit-report.md`` lists each variant's size, bits per weight, KL divergence to the base, perplexity
change, same-top-token rate, speed and gate outcome; ``quantkit-report.png`` plots quality loss (mean KLD, or
the perplexity increase when no KLD was measured) against size, each point labelled with its tok/s. Both are
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


def markdown(recipe, results, *, base_sha: str | None = None, image: str = REPORT_PNG) -> str:
    """The Markdown report (deterministic for the same inputs: no timestamps)."""
    e = recipe.eval
    gates = [g.rule(getattr(e, g.name)) for g in GATES if getattr(e, g.name) is not None]
    base_ppl = next((r.eval.base_ppl for r in results if r.eval and r.eval.base_ppl), None)
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
        "| variant | method | size | bits/weight | KLD | PPL change | top-1 | tok/s | result |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        ev = r.eval
        kld = f"{ev.kld_mean:.5f}" if ev and ev.kld_mean is not None else "-"
        dppl = f"{ev.ppl_increase * 100:+.2f}%" if ev and ev.ppl_ratio is not None else "-"
        top1 = f"{ev.top1 * 100:.2f}%" if ev and ev.top1 is not None else "-"
        tps = r.tokens_per_second
        status = {"gate failed": "**gate failed**", "failed": "**failed**"}.get(r.status, "passed")
        if r.status == "failed" and r.error:
            status += f" ({r.error[:60]})"
        bpw = f"{r.bits_per_weight:.2f}" if r.bits_per_weight else "-"
        lines.append(f"| {r.name} | {r.method} | {human_size(r.size) if r.size else '-'} | {bpw} | {kld} | {dppl} "
                     f"| {top1} | {f'{tps:.1f}' if tps else '-'} | {status} |")
    lines += _task_lines(recipe, results)
    speed = _speed_note(results)
    if speed:
        lines += ["", speed]
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


def _speed_note(results) -> str | None:
    b = next((r.bench for r in results if r.bench), None)
    if b:
        return (f"tok/s: generation speed measured by `quantkit bench` on {b.device or '?'} with "
                f"{b.engine or '?'}; it depends on the machine and its load.")
    if any(r.eval for r in results):
        return "tok/s: scoring throughput during the evaluation (no benchmark was run)."
    return None


def chart(path: str | os.PathLike, recipe, results) -> bool:
    """Write the PNG: quality loss (KLD, else PPL increase) against size; False when nothing was measured."""
    pts = [r for r in results if r.eval and r.size]
    if not pts:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    use_kld = all(r.eval.kld_mean is not None for r in pts)
    fig, ax = plt.subplots(figsize=(7.5, 4.6), dpi=110)
    colors = {"gguf": "#1f77b4", "awq": "#d62728", "gptq": "#2ca02c"}
    scale, unit = (1e9, "GB") if max(r.size for r in pts) > 2e9 else (1e6, "MB")
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
    xs_all = [r.size / scale for r in pts]
    ax.set_xlim(min(xs_all) * 0.85, max(xs_all) * 1.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)
    return True


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
