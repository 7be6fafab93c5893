"""quantkit gguf versus llama.cpp's converter + llama-quantize run by hand: wall time and peak RSS.

    python3 benchmarks/gguf_pipeline.py [--models smollm2,synthetic] [--synthetic-layers 8 --synthetic-hidden 2048]
                                        [--no-per-type] [--work DIR]

For each model and for 1 type (Q4_K_M) and 4 types (Q4_K_M,Q5_K_M,Q6_K,Q8_0), every pipeline starts from a
fresh output folder (the HF download/folder is shared):

* ``quantkit``     ``quantkit gguf MODEL --types ... --out DIR`` (convert once, quantise in-process, verify each
                   type against the base; the base's reference and llama.cpp's token ids are not cached:
                   every run is a first run)
* ``direct``       ``convert_hf_to_gguf.py`` once, then one ``llama-quantize`` per type (what the llama.cpp
                   README says to do), with the same outtype and ``--model-name`` so the files can be compared
* ``direct/type``  a conversion per type, then ``llama-quantize`` (a script that loops over types naively;
                   4 types only; ``--no-per-type`` skips it)

Peak RSS is the maximum over time of the summed RSS of the whole process tree (sampled every 50 ms with
psutil). ``identical`` says whether quantkit's files are byte-identical to llama-quantize's. The synthetic
model is a random Llama (bf16 safetensors) built from a config with SmolLM2's tokenizer. Prints a table and
writes ``benchmarks/results/gguf_pipeline.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from quantkit import llamacpp  # noqa: E402
from quantkit.gguf import artifact_name, resolve_outtype  # noqa: E402
from quantkit.util import format_table, sha256_file  # noqa: E402

TYPES_1 = ["Q4_K_M"]
TYPES_4 = ["Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"]


def run_tree(cmd: list[str], env: dict | None = None, log: Path | None = None) -> dict:
    """Run ``cmd``; return wall seconds and the peak summed RSS of its process tree."""
    t0 = time.perf_counter()
    out = open(log, "wb") if log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        total = 0
        try:
            procs = [ps] + ps.children(recursive=True)
        except psutil.NoSuchProcess:
            break
        for p in procs:
            try:
                total += p.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        peak = max(peak, total)
        time.sleep(0.05)
    rc = proc.wait()
    wall = time.perf_counter() - t0
    if log:
        out.close()
    if rc != 0:
        tail = log.read_text(errors="replace")[-2000:] if log else ""
        raise SystemExit(f"{cmd[:3]} failed with {rc}:\n{tail}")
    return {"seconds": round(wall, 2), "peak_rss_mb": round(peak / 1e6, 1)}


def bench_model(label: str, model: Path, work: Path, per_type: bool) -> list[dict]:
    conv_dir = llamacpp.ensure_sources()
    conv_env = llamacpp.converter_env()
    quantize, tool_env = llamacpp.tool("llama-quantize")
    outtype = resolve_outtype("auto", model)
    name = model.name
    rows = []
    for types in (TYPES_1, TYPES_4):
        tag = f"{len(types)} type" + ("s" if len(types) > 1 else "")
        # quantkit
        qdir = work / f"{label}-quantkit-{len(types)}"
        shutil.rmtree(qdir, ignore_errors=True)
        env = {**os.environ, "QUANTKIT_NO_PROGRESS": "1"}
        from quantkit.util import cache_home

        for sub in ("eval", "tokenize"):  # a first run: the base's reference and llama.cpp's token ids not cached
            shutil.rmtree(cache_home() / sub, ignore_errors=True)
        r = run_tree([sys.executable, "-m", "quantkit.cli", "gguf", str(model), "--types", ",".join(types),
                      "--out", str(qdir), "--outtype", outtype], env=env, log=work / f"{qdir.name}.log")
        rows.append({"model": label, "types": tag, "pipeline": "quantkit", **r})
        # direct: convert once + llama-quantize per type
        ddir = work / f"{label}-direct-{len(types)}"
        shutil.rmtree(ddir, ignore_errors=True)
        ddir.mkdir(parents=True)
        inter = ddir / f"{name}-{outtype.upper()}.gguf"
        script = [f"{sys.executable} {conv_dir / 'convert_hf_to_gguf.py'} {model} --outtype {outtype} "
                  f"--outfile {inter} --model-name {name}"]
        script += [f"{quantize} {inter} {ddir / artifact_name(name, t)} {t}" for t in types]
        denv = {**conv_env, "LD_LIBRARY_PATH": tool_env.get("LD_LIBRARY_PATH", "")}
        r = run_tree(["bash", "-ec", " && ".join(script)], env=denv, log=work / f"{ddir.name}.log")
        identical = all(sha256_file(qdir / artifact_name(name, t)) == sha256_file(ddir / artifact_name(name, t))
                        for t in types)
        rows.append({"model": label, "types": tag, "pipeline": "direct", **r, "identical": identical})
        shutil.rmtree(ddir, ignore_errors=True)
        # direct, one conversion per type
        if per_type and len(types) > 1:
            pdir = work / f"{label}-pertype-{len(types)}"
            shutil.rmtree(pdir, ignore_errors=True)
            pdir.mkdir(parents=True)
            script = []
            for t in types:
                inter = pdir / f"{name}-{outtype.upper()}-{t}.gguf"
                script += [f"{sys.executable} {conv_dir / 'convert_hf_to_gguf.py'} {model} --outtype {outtype} "
                           f"--outfile {inter} --model-name {name}",
                           f"{quantize} {inter} {pdir / artifact_name(name, t)} {t}", f"rm -f {inter}"]
            r = run_tree(["bash", "-ec", " && ".join(script)], env=denv, log=work / f"{pdir.name}.log")
            rows.append({"model": label, "types": tag, "pipeline": "direct/type", **r})
            shutil.rmtree(pdir, ignore_errors=True)
        shutil.rmtree(qdir, ignore_errors=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,synthetic")
    ap.add_argument("--synthetic-layers", type=int, default=8)
    ap.add_argument("--synthetic-hidden", type=int, default=2048)
    ap.add_argument("--no-per-type", action="store_true", help="skip the convert-per-type baseline")
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / "results" / "gguf-work"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    import fixtures_models as fm

    rows = []
    info = {}
    for label in args.models.split(","):
        if label == "smollm2":
            model = fm.build_smollm2_hf()
        elif label == "synthetic":
            model = fm.build_synthetic_llama(args.synthetic_layers, args.synthetic_hidden, root=work)
        else:
            model = Path(label)
        size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
        info[label] = {"path": str(model), "safetensors_bytes": size, "outtype": resolve_outtype("auto", model)}
        print(f"# {label}: {model} ({size / 1e9:.2f} GB safetensors, outtype {info[label]['outtype']})",
              file=sys.stderr, flush=True)
        rows += bench_model(label, model, work, per_type=not args.no_per_type)
    # ratios against the direct pipeline of the same model/types
    base = {(r["model"], r["types"]): r for r in rows if r["pipeline"] == "direct"}
    for r in rows:
        b = base[(r["model"], r["types"])]
        r["time_vs_direct"] = round(r["seconds"] / b["seconds"], 2)
        r["rss_vs_direct"] = round(r["peak_rss_mb"] / b["peak_rss_mb"], 2)
    table = format_table([[r["model"], r["types"], r["pipeline"], f"{r['seconds']:.1f}", f"{r['time_vs_direct']:.2f}x",
                           f"{r['peak_rss_mb']:.0f}", f"{r['rss_vs_direct']:.2f}x",
                           {True: "yes", False: "NO"}.get(r.get("identical"), "")] for r in rows],
                         ["model", "types", "pipeline", "wall s", "vs direct", "peak RSS MB", "vs direct",
                          "identical"])
    print(table)
    res_dir = ROOT / "benchmarks" / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    cpu = {"cpus": os.cpu_count(), "load_avg_at_end": os.getloadavg()}
    path = res_dir / "gguf_pipeline.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    # keep other models' rows from an earlier invocation (e.g. --models smollm2, then --models synthetic)
    keep = [r for r in old.get("rows", []) if r["model"] not in info]
    data = {"models": {**{k: v for k, v in old.get("models", {}).items() if k not in info}, **info},
            "rows": keep + rows, "machine": cpu, "table": table}
    path.write_text(json.dumps(data, indent=2))
    print(f"\nwrote {res_dir / 'gguf_pipeline.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
