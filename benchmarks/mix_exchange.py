"""How much any per-layer mix of llama.cpp's types can gain over a preset: measured one-step moves and a bound.

    python3 benchmarks/mix_exchange.py [--model smollm2-continuous] [--preset Q5_K_M] [--tokens 2048]

Starting from the preset's own tensor types (same importance matrix as ``auto:`` uses), for every layer two files
are scored against the HF base on the *calibration* text (what the auto search sees; 2048 tokens, ctx 512):

* **up**: every tensor of that layer at Q8_0; the KLD it removes, and the bytes it adds;
* **down**: every tensor of that layer one type lower (Q8_0 -> Q5_1, Q6_K -> Q5_K, Q5_1 -> Q5_0, Q5_K -> Q4_K,
  Q5_0 -> Q4_0, Q4_K -> Q3_K); the KLD it adds, and the bytes it frees.

Then an exact search (dynamic programming over bytes, 10 kB steps) picks, per layer, up / down / unchanged to
minimise the predicted KLD with no more bytes than the preset: the best a mix that moves whole layers by these steps
can reach if the moves add up (their measured sum is what the bound uses). The auto search also predicts every
preset file; its prediction is printed beside the measurement. Writes ``benchmarks/mix_exchange.md`` / ``.json``
(one section / key per preset: a run replaces only its own).
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

from quantkit import gguf_mix as gm  # noqa: E402
from quantkit.gguf import _load_calibration, _tokenizer, quantize_gguf  # noqa: E402
from quantkit.ggufio import quantize_file  # noqa: E402
from quantkit.util import format_table  # noqa: E402

DOWN = {"Q8_0": "Q5_1", "Q6_K": "Q5_K", "Q5_1": "Q5_0", "Q5_K": "Q4_K", "Q5_0": "Q4_0", "Q4_K": "Q3_K"}
STEP = 10_000  # bytes per unit of the exchange search


def _bytes(opts: dict, typ: str) -> int | None:
    return next((gm._align(o["bytes"]) for o in opts.values() if o["type"] == typ), None)


def best_exchange(moves: dict[int, dict], step: int = STEP) -> tuple[float, dict[int, str]]:
    """``(KLD removed, {layer: "up"|"down"})``: the most KLD removed by moving layers up / down with no more bytes
    in all than freed. ``moves[layer] = {"up": (kld removed, bytes added), "down": (kld added, bytes freed)}``."""
    best = {0: (0.0, {})}
    for layer, m in sorted(moves.items()):
        nxt = dict(best)
        for units, (v, chosen) in best.items():
            options = (("up", m["up"][0], -(-m["up"][1] // step)),  # bytes added, rounded up
                       ("down", -m["down"][0], -(m["down"][1] // step)))  # bytes freed, rounded down
            for name, dv, du in options:
                u = units + du
                if u not in nxt or nxt[u][0] < v + dv:
                    nxt[u] = (v + dv, {**chosen, layer: name})
        best = nxt
    return max((vc for u, vc in best.items() if u <= 0), key=lambda vc: vc[0])


def run(name: str, preset: str, work: Path, tokens: int) -> dict:
    base = model_path(name)
    out = work / name
    res = quantize_gguf(str(base), [preset, f"auto:{preset}"], out, calibration="builtin", threads=2)
    rec = res.manifest.artifacts[res.artifacts[1]]["mix"]
    table = _table(rec)
    inter = res.folder / res.manifest.data["intermediates"]["convert"]["path"]
    imx = res.imatrix
    pfile = res.folder / res.manifest.artifacts[res.artifacts[0]]["path"]
    ptypes = {n: t for n, (t, _b) in gm.tensor_bytes(pfile)[0].items()}
    T = table["tensors"]
    text = "\n\n".join(_load_calibration("builtin", _tokenizer(base)).texts)
    predicted_preset = gm.predicted_kld(table, ptypes)
    layers = sorted({gm.layer_of(n) for n in T if gm.layer_of(n) is not None})
    scratch = res.folder / ".quantkit-work" / "exchange"
    scratch.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    files, info = [scratch / "preset.gguf"], {}
    quantize_file(inter, files[0], preset, threads=2, imatrix=imx, overrides=gm.overrides(ptypes))
    for L in layers:
        up, down = dict(ptypes), dict(ptypes)
        added = freed = 0
        for n in T:
            if gm.layer_of(n) != L or ptypes[n] not in DOWN:
                continue
            here, q8, lower = _bytes(T[n], ptypes[n]), _bytes(T[n], "Q8_0"), _bytes(T[n], DOWN[ptypes[n]])
            if q8 is not None:
                up[n] = "Q8_0"
                added += q8 - here
            if lower is not None:
                down[n] = DOWN[ptypes[n]]
                freed += here - lower
        info[L] = {"bytes_added": added, "bytes_freed": freed}
        for kind, assign in (("up", up), ("down", down)):
            f = scratch / f"{kind}-{L}.gguf"
            quantize_file(inter, f, preset, threads=2, imatrix=imx, overrides=gm.overrides(assign))
            files.append(f)
    klds = gm._kld(base, files, text, 2, tokens=tokens)
    for f in files:
        f.unlink()
    k0, rest = klds[0], klds[1:]
    for i, L in enumerate(layers):
        info[L]["kld_removed_up"] = k0 - rest[2 * i]
        info[L]["kld_added_down"] = rest[2 * i + 1] - k0
    removed, chosen = best_exchange({L: {"up": (v["kld_removed_up"], v["bytes_added"]),
                                         "down": (v["kld_added_down"], v["bytes_freed"])} for L, v in info.items()})
    return {"model": name, "preset": preset, "tokens": tokens, "kld_preset": k0,
            "kld_preset_predicted": predicted_preset, "auto_check": rec["search"]["check"],
            "auto_fallback": rec["fallback"], "layers": {str(L): v for L, v in info.items()},
            "bound_kld": k0 - removed, "bound_ratio": (k0 - removed) / k0,
            "bound_moves": {str(L): m for L, m in sorted(chosen.items())},
            "seconds": round(time.perf_counter() - t0, 1),
            "provenance": f"Provenance: benchmarks/mix_exchange.py --preset {preset} --tokens {tokens}, "
                          f"{time.strftime('%Y-%m-%d')}, {_machine()}."}


def _machine() -> str:
    import os

    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    return f"{os.cpu_count()} cores, {'AVX512' if 'avx512f' in flags else 'AVX2'}"


def _table(rec: dict) -> dict:
    """The auto search's cached sensitivity table (the mix record names its sha256)."""
    from quantkit.util import sha256_bytes

    want = rec["sensitivity"]["sha256"]
    for p in gm._cache_dir().glob("*.json"):
        blob = p.read_bytes()
        if sha256_bytes(blob) == want:
            return json.loads(blob)
    raise SystemExit("the auto search's sensitivity table is not in the cache")


def report(r: dict) -> str:
    rows = [[L, f"{v['kld_removed_up']:+.5f}", f"{v['bytes_added'] / 1e6:.2f}", f"{v['kld_added_down']:+.5f}",
             f"{v['bytes_freed'] / 1e6:.2f}", r["bound_moves"].get(L, "")] for L, v in r["layers"].items()]
    ups = sorted(v["kld_removed_up"] for v in r["layers"].values())
    return (f"# Per-layer exchange at {r['preset']} size ({r['model']}, calibration text, {r['tokens']} tokens)\n\n"
            f"Preset KLD {r['kld_preset']:.5f} (the auto search's model predicts {r['kld_preset_predicted']:.5f}); "
            f"the auto mix's own check: {r['auto_check']}, fallback: {r['auto_fallback']}.\n\n"
            f"KLD removed by one layer at Q8_0: median {ups[len(ups) // 2]:.5f}, max {ups[-1]:.5f}. "
            f"**Best budget-neutral exchange of whole layers: KLD {r['bound_kld']:.5f}, ratio "
            f"{r['bound_ratio']:.3f}** (moves summed as measured"
            + (f"; {r['seconds']:.0f} s of quantising and scoring" if r.get("seconds") else "") + ").\n\n"
            "```\n" + format_table(rows, ["layer", "up: KLD removed", "up: +MB", "down: KLD added", "down: -MB",
                                          "bound"]) + "\n```\n"
            + "".join(f"\n{r[k]}\n" for k in ("provenance", "reading") if r.get(k)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-continuous")
    ap.add_argument("--preset", default="Q5_K_M")
    ap.add_argument("--tokens", type=int, default=gm.CHECK_TOKENS)
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "quantkit-bench" / "gguf_mix"))
    a = ap.parse_args(argv)
    r = run(a.model, a.preset, Path(a.work), a.tokens)
    here = Path(__file__).with_suffix("")
    try:
        runs = json.loads(here.with_suffix(".json").read_text())
    except (OSError, ValueError):
        runs = {}
    if "preset" in runs:  # the one-preset layout of the first run
        runs = {runs["preset"]: runs}
    runs[r["preset"]] = r
    runs = dict(sorted(runs.items()))
    here.with_suffix(".json").write_text(json.dumps(runs, indent=2) + "\n")
    here.with_suffix(".md").write_text("\n".join(report(v) for v in runs.values()))
    print(report(r))


if __name__ == "__main__":
    main()
