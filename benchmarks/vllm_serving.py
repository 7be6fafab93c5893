"""Base vs every HF format served by vLLM on this machine, with the same numbers from transformers beside them.

One run, on SmolLM2-135M-Instruct (the demo model) by default:

1. quantkit makes each variant (GPTQ classic = quantkit's default, GPTQ compressed-tensors, AWQ classic, AWQ
   compressed-tensors; ``--group-size 64``, ``--samples`` x ``--seq-len`` calibration), each verified on build
   (in vLLM where it can run the scheme);
2. ``quantkit eval`` scores base and variants on the held-out built-in eval text (``--tokens``, ctx 512) with
   ``--engine vllm`` (the base served by the same vLLM; KLD: top-k lower bound) and ``--engine transformers``
   (full logits; KLD with tail samples);
3. ``quantkit bench`` measures each in vLLM (one request: prompt tok/s from the time to first token, generation
   tok/s; 8 concurrent requests: aggregate generation tok/s; server memory) and in transformers (one request),
   each against the base in the same engine.

    python3 benchmarks/vllm_serving.py [--model DIR] [--formats gptq:classic,...] [--tokens 4096] [--threads N]

Writes benchmarks/vllm_serving.json and benchmarks/vllm_serving.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from quantkit.util import format_table, human_size  # noqa: E402

COMBOS = ("gptq:classic", "gptq:compressed-tensors", "awq:classic", "awq:compressed-tensors")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="HF folder (default: the demo model)")
    ap.add_argument("--formats", default=",".join(COMBOS))
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / "work-vllm"))
    a = ap.parse_args(argv)

    from quantkit.bench import bench
    from quantkit.demo import build_smollm2_hf
    from quantkit.evaluate import evaluate
    from quantkit.hfquant import run
    from quantkit.vllm import close_all, find_vllm

    inst, why = find_vllm()
    if inst is None:
        raise SystemExit(f"no vLLM: {why}")
    model = Path(a.model) if a.model else build_smollm2_hf()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    folders, built = {}, {}
    for combo in a.formats.split(","):
        method, fmt = combo.split(":")
        tq = time.perf_counter()
        res = run(method, str(model), fmt=fmt, group_size=a.group_size, samples=a.samples, seq_len=a.seq_len,
                  out=work / f"{method}-{fmt}")
        folders[combo] = res.folder
        (art,) = res.manifest.artifacts.values()
        built[combo] = {"seconds": round(time.perf_counter() - tq, 1), "verify": art.get("verify"),
                        "size": art.get("size"), "cached": res.cached}
    out = {"model": str(model), "vllm": inst.label, "settings": vars(a), "built": built, "eval": {}, "bench": {}}
    paths = [str(folders[c]) for c in folders]
    for engine in ("vllm", "transformers"):
        rep = evaluate(str(model), paths, ctx=512, max_tokens=a.tokens, write_manifest=False, engine=engine,
                       threads=a.threads)
        out["eval"][engine] = {"base": rep.base, "rows": {c: r for c, r in zip(folders, rep.rows)},
                               "context": {k: rep.context[k] for k in ("tokens", "text", "layout")}}
        brep = bench(paths, base=str(model), prompt_tokens=a.prompt_tokens, gen_tokens=a.gen_tokens,
                     repeats=a.repeats, threads=a.threads, write_manifest=False, engine=engine, use_cache=False)
        out["bench"][engine] = {"base": brep.bases[0] if brep.bases else None,
                                "rows": {c: r for c, r in zip(folders, brep.rows)}, "warnings": brep.warnings,
                                "context": brep.context}
        close_all()
    out["seconds"] = round(time.time() - t0, 1)
    (ROOT / "benchmarks" / "vllm_serving.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
    md = render(out)
    (ROOT / "benchmarks" / "vllm_serving.md").write_text(md)
    print(md)
    return 0


def render(out: dict) -> str:
    def pct(x):
        return f"{(x - 1) * 100:+.1f}%" if x is not None else "—"

    def f(x, spec=".1f"):
        return format(x, spec) if isinstance(x, (int, float)) else "—"

    ev, be = out["eval"], out["bench"]
    rows = []
    for name in ["base"] + list(out["built"]):
        cells = [name]
        for eng in ("vllm", "transformers"):
            e = ev[eng]["base"] if name == "base" else ev[eng]["rows"][name]
            b = be[eng]["base"] if name == "base" else be[eng]["rows"][name]
            cells += [f(e["ppl"], ".3f"), "" if name == "base" else pct(e["ppl_ratio"]),
                      "" if name == "base" else f(e["kld_mean"], ".4f"),
                      "" if name == "base" else f"{e['top1'] * 100:.1f}%",
                      f(b.get("pp_tps")), f(b.get("tg_tps"))]
            if eng == "vllm":
                cells += [f(b.get("tg_tps_concurrent")), f((b.get("ttft_s") or 0) * 1000, ".0f")]
            cells += [human_size(b["peak_memory"]) if b.get("peak_memory") else "—"]
        rows.append(cells)
    headers = ["model"]
    for eng, label in (("vllm", "vLLM"), ("transformers", "tf")):
        headers += [f"{label} PPL", f"{label} dPPL", f"{label} KLD", f"{label} top-1", f"{label} pp tok/s",
                    f"{label} tg tok/s"]
        if eng == "vllm":
            headers += ["vLLM tg x8 tok/s", "vLLM TTFT ms"]
        headers += [f"{label} mem"]
    built = [[c, human_size(b["size"]) if b.get("size") else "—", f"{b['seconds']:.0f} s",
              (b["verify"] or {}).get("engine", "—"),
              f(((b["verify"] or {}).get("kld")), ".4f"), "passed" if (b["verify"] or {}).get("passed") else "FAILED"]
             for c, b in out["built"].items()]
    s = out["settings"]
    hw = be["vllm"]["context"]["hardware"]
    lines = [
        "# HF formats served by vLLM vs transformers (benchmarks/vllm_serving.py)", "",
        f"Model {Path(out['model']).name}; {out['vllm']}; group size {s['group_size']}, calibration "
        f"{s['samples']} x {s['seq_len']} tokens (builtin); {hw['cpu']}, {hw['threads']} threads; "
        f"load average {be['vllm']['context'].get('load_avg_1m') or 0:.2f} at the start; "
        f"one run of {out['seconds']:.0f} s.",
        "",
        "Built and verified on build (255 tokens; the engine that checked it):", "",
        format_table(built, ["variant", "size", "quantise+verify", "verify engine", "verify KLD", "verify"]), "",
        f"Quality on {ev['vllm']['context']['tokens']} held-out tokens ({ev['vllm']['context']['text']}, "
        f"{ev['vllm']['context']['layout']}); each engine against the base in that engine. vLLM's KLD is the "
        "top-k lower bound (base top 64 vs the variant's top 256); transformers' uses the full logits "
        "(top 64 + tail samples). Speed: prompt "
        f"{s['prompt_tokens']} tokens, {s['gen_tokens']} generated, {s['repeats']} repeats; vLLM over its OpenAI "
        "API (one request, then 8 at once), transformers one request in-process; memory: vLLM server processes' "
        "RSS (incl. its 1 GiB KV cache), transformers weights + KV.", "",
        format_table(rows, headers), "",
    ]
    for eng in ("vllm", "transformers"):
        for w in be[eng]["warnings"]:
            lines.append(f"- warning ({eng}): {w}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
