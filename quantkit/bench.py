"""``quantkit bench``: speed, size and memory of each variant in its own engine, with the gain vs the base
measured **in the same engine**.

* GGUF -> llama.cpp (llama-cpp-python; all layers on the GPU when llama.cpp was built with GPU support);
  HF-format models -> vLLM (``vllm serve``, measured over its OpenAI API: one request, then
  :data:`VLLM_CONCURRENCY` at once) where this machine's vLLM can run the scheme, its base served the same way;
  else transformers on CUDA when available, else CPU.
* The base, once per engine used: for GGUF variants the unquantised GGUF they were made from (the F32/F16/BF16
  intermediate in ``<folder>/.quantkit-work/``, converted again when it was deleted) in llama.cpp; for
  AWQ/GPTQ/compressed-tensors the base checkpoint in transformers. Gains are relative to that row. ``--base
  HF_MODEL`` with GGUF variants adds the base in transformers as a labelled *reference* row (what you would run
  otherwise); no gain is computed against it. Base rows are cached in ``~/.cache/quantkit/bench/``, keyed by the
  base's identity, engine version, hardware, threads, token counts and repeats.
* Each model is measured in its **own child process** (a fresh interpreter), so engines do not share thread pools or
  allocator state. Peak memory is what the engine holds for the model (``peak_memory_method`` says how):
  llama.cpp's own buffer sizes (model + KV cache + compute + output, from its load log); in transformers the
  bytes of the parameters, buffers and the KV cache after the longest pass. The process's peak RSS (runtime
  included) is recorded next to it (``peak_rss``).
* One warm-up pass (the full prompt + a few generated tokens), then ``repeats`` timed passes: prompt
  processing = ``prompt_tokens`` ids in one forward pass (tok/s), generation = ``gen_tokens`` greedy tokens one
  at a time on top of that prompt (tok/s). Mean and sample standard deviation over the repeats; a warning when
  the stddev is above 10% of the mean (a busy machine). The 1-minute load average at the start is recorded.
* The prompt is the start of the built-in evaluation text, tokenised by the model's own tokenizer.
* Hardware (CPU model, threads, GPU) is recorded with the numbers so two reports can be compared.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from quantkit import engines
from quantkit.engines import WARMUP_GEN, peak_rss
from quantkit.engines.hf import hf_format
from quantkit.errors import QuantkitError
from quantkit.evaluate import Variant, _weights_size, default_threads, hardware, resolve_variants
from quantkit.records import BenchScore
from quantkit.util import (
    cache_home,
    format_table,
    human_size,
    ignore_sigint,
    now_iso,
    safetensors_tensors,
    sigint_held,
    write_json_atomic,
)

log = logging.getLogger(__name__)

MAX_SPREAD = 0.10  # stddev / mean above this -> a warning (busy machine)
CACHE_VERSION = 1


# ------------------------------------------------------------------------------------------ sizes
def safetensors_stats(folder: Path) -> tuple[int, int]:
    """``(parameters, tensor bytes)`` from the safetensors headers of a folder (no weights are read)."""
    params = nbytes = 0
    for _, _, shape, size in safetensors_tensors(folder):
        params += math.prod(shape)
        nbytes += size
    return params, nbytes


def _stats(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _bench_child(engine: str, path: str, prompt_tokens: int, gen_tokens: int, repeats: int, threads: int) -> dict:
    """Runs in a spawned process: measure one model in ``engine``, return plain data (peak RSS included)."""
    os.environ.setdefault("QUANTKIT_NO_PROGRESS", "1")
    out = engines.get(engine).speed(path, prompt_tokens, gen_tokens, repeats, threads)
    out["peak_rss_bytes"] = peak_rss()
    return out


def _child_main() -> None:
    """The isolated measurement's own process (``python -c``, started by :func:`_run_isolated`): it ignores
    SIGINT (the parent owns the user's Ctrl-C and kills this process), runs one measurement and writes its row, or
    its user error, as JSON to the file the parent named. A plain process, not a multiprocessing pool: no
    semaphores for a resource tracker to find leaked when the parent stops it mid-way."""
    ignore_sigint()
    spec = json.loads(sys.argv[1])
    try:
        out = {"result": _bench_child(*spec["args"])}
    except QuantkitError as e:
        out = {"error": str(e)}
    write_json_atomic(Path(spec["out"]), out)


_CHILD = ("import json, sys; sys.path[:] = json.loads(sys.argv[1])['path']; "
          "from quantkit.bench import _child_main; _child_main()")


def _run_isolated(engine: str, path: Path, prompt_tokens: int, gen_tokens: int, repeats: int, threads: int,
                  isolate: bool) -> dict:
    if engines.get(engine).in_process:  # a server process of its own already
        return engines.get(engine).speed(str(path), prompt_tokens, gen_tokens, repeats, threads)
    if not isolate:
        return _bench_child(engine, str(path), prompt_tokens, gen_tokens, repeats, threads)
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="quantkit-bench-") as tmp:
        result = Path(tmp) / "row.json"
        spec = {"args": [engine, str(path), prompt_tokens, gen_tokens, repeats, threads], "out": str(result),
                "path": sys.path}
        proc = None
        try:
            # the child starts whole, SIGINT blocked until it ignores it; a Ctrl-C meanwhile is raised after: kill
            with sigint_held():
                proc = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(spec)])
            code = proc.wait()
        except KeyboardInterrupt:  # stop the measurement now, not when its child would have finished
            if proc is not None:
                proc.kill()
                proc.wait()
            raise
        data = json.loads(result.read_text()) if result.is_file() else None
    if data is None:
        how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        raise QuantkitError(f"the benchmark process for {path} died ({how}: out of memory, or the engine crashed "
                            "on this model); try fewer --prompt-tokens or check the file loads")
    if "error" in data:
        raise QuantkitError(data["error"])
    return data["result"]


# ------------------------------------------------------------------------------------------ report
GAINS = BenchScore.GAINS  # (gain key, row key, lower is better): one table, in records.py


@dataclass
class BenchReport:
    rows: list[dict]
    bases: list[dict]  # base rows (role "base", one per engine used) and reference rows (role "reference")
    context: dict
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def base(self) -> dict | None:
        """The first base row (the one the first variant is compared with)."""
        return next((b for b in self.bases if b["role"] == "base"), None)

    def to_json(self) -> dict:
        return {"base": self.base, "bases": self.bases, "variants": self.rows, "context": self.context,
                "notes": self.notes, "warnings": self.warnings}

    def table(self) -> str:
        headers = ["model", "engine", "device", "size", "bpw", "pp tok/s", "tg tok/s", "peak mem", "pp gain",
                   "tg gain", "size gain", "mem gain"]

        def fmt(r, label=""):
            def g(key):
                v = r.get(key)
                return "" if v is None else f"{v:.2f}x"

            return [r["name"] + label, r["engine_short"], r["device"],
                    human_size(r["size"]) if r.get("size") else "",
                    f"{r['bits_per_weight']:.2f}" if r.get("bits_per_weight") else "",
                    f"{r['pp_tps']:.1f} ± {r['pp_tps_std']:.1f}", f"{r['tg_tps']:.1f} ± {r['tg_tps_std']:.1f}",
                    human_size(r["peak_memory"]) if r.get("peak_memory") else "",
                    g("pp_gain"), g("tg_gain"), g("size_gain"), g("memory_gain")]

        rows = [fmt(b, f" ({b['label']}{', cached' if b.get('cached') else ''})") for b in self.bases]
        rows += [fmt(r) for r in self.rows]
        conc = {r.get("concurrency") for r in self.bases + self.rows} - {None}
        if conc:  # served by vLLM: time to first token and the throughput of N requests at once
            headers = headers + ["TTFT", f"tg x{max(conc)} tok/s", f"tg x{max(conc)} gain"]
            for row, r in zip(rows, self.bases + self.rows):
                row += [f"{r['ttft_s'] * 1000:.0f} ms" if r.get("ttft_s") else "",
                        f"{r['tg_tps_concurrent']:.1f}" if r.get("tg_tps_concurrent") else "",
                        f"{r['tg_concurrent_gain']:.2f}x" if r.get("tg_concurrent_gain") else ""]
        c = self.context
        hw = c["hardware"]
        head = (f"prompt {c['prompt_tokens']} tokens, generate {c['gen_tokens']} tokens, {c['repeats']} repeats "
                f"after a warm-up; {hw['cpu']} ({hw['threads']} threads)"
                + (f", GPU {hw['gpu']}" if hw.get("gpu") else "")
                + (f"; load average {c['load_avg_1m']:.2f} at the start" if c.get("load_avg_1m") is not None else ""))
        lines = [head, "", format_table(rows, headers)]
        methods = sorted({r["peak_memory_method"] for r in self.bases + self.rows if r.get("peak_memory_method")})
        lines += [f"peak mem: {m}" for m in methods]
        lines += [f"note: {n}" for n in self.notes]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _row(name: str, v: Variant | None, eng: engines.Engine, path: Path, size: int, res: dict,
         bpw: float | None) -> dict:
    pp, pp_sd = _stats(res["pp"])
    tg, tg_sd = _stats(res["tg"])
    return {"name": name, "kind": eng.kind, "path": str(path), "format": v.format if v else eng.kind,
            "artifact": v.artifact if v else None, "engine": res["engine"],
            "engine_short": eng.short, "device": res["device"], "size": size,
            "bits_per_weight": bpw, "pp_tps": pp, "pp_tps_std": pp_sd, "tg_tps": tg, "tg_tps_std": tg_sd,
            "pp_runs": res["pp"], "tg_runs": res["tg"],
            "peak_memory": res.get("model_memory") or res.get("peak_rss_bytes"),
            "peak_memory_method": res.get("peak_memory_method") or "peak RSS of the benchmark process (VmHWM)",
            "memory_breakdown": res.get("memory_breakdown"), "peak_rss": res.get("peak_rss_bytes"),
            "peak_gpu_memory": res.get("peak_gpu_bytes"), "load_seconds": round(res.get("load_seconds", 0), 2),
            **({"ttft_s": _stats(res["ttft"])[0], "concurrency": res["concurrency"],
                "tg_tps_concurrent": _stats(res["tg_concurrent"])[0],
                "tg_tps_concurrent_std": _stats(res["tg_concurrent"])[1]} if "ttft" in res else {})}


def _measure(engine: str, name: str, v: Variant | None, path: Path, size: int, ctx: dict,
             base_params: int | None = None) -> dict:
    """Run one model in ``engine`` (own process unless ``ctx['isolate']`` is false) -> its row."""
    eng = engines.get(engine)
    res = _run_isolated(engine, path, ctx["prompt_tokens"], ctx["gen_tokens"], ctx["repeats"], ctx["threads"],
                        ctx["isolate"])
    if eng.kind == "gguf":  # bits per weight: llama.cpp's own count, else from the safetensors headers
        bpw = res["tensor_bytes"] * 8 / res["params"] if res.get("params") else (v.bits_per_weight if v else None)
    else:
        params, nbytes = safetensors_stats(path)
        if hf_format(path) == "hf" and params:
            bpw = nbytes * 8 / params
        else:
            bpw = (v.bits_per_weight if v else None) or (nbytes * 8 / base_params if base_params else None)
    return _row(name, v, eng, path, size, res, bpw)


# ------------------------------------------------------------------------------------------ bases
@dataclass
class BaseSpec:
    """One base to measure: which engine, which file/folder, and what identifies it for the cache."""

    engine: str  # a key of quantkit.engines.ENGINES
    path: Path
    name: str
    identity: dict
    role: str = "base"  # "base" (gains are computed against it) | "reference" (shown, labelled, no gains)

    @property
    def kind(self) -> str:  # "gguf" | "hf"
        return engines.get(self.engine).kind

    @property
    def label(self) -> str:
        if self.role == "reference":
            return f"reference: base in {engines.get(self.engine).short}"
        return f"base, {engines.get(self.engine).short}"


def _gguf_identity(path: Path, manifest_rec: dict | None = None) -> dict:
    """A GGUF base's identity: the converter key + size for a quantkit intermediate; else path, size, mtime."""
    st = path.stat()
    if manifest_rec and manifest_rec.get("key"):
        return {"convert": manifest_rec["key"], "size": st.st_size}
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _folder_gguf_base(folder: Path) -> BaseSpec:
    from quantkit.gguf import unquantised_gguf
    from quantkit.manifest import Manifest

    path = unquantised_gguf(folder)  # converts it again (and records it) when it was deleted
    rec = Manifest.load(folder, create=False).data["intermediates"].get("convert")
    return BaseSpec("llama.cpp", path, path.stem, _gguf_identity(path, rec))


def _hf_base(spec: str) -> BaseSpec:
    from quantkit.hub import resolve_model

    src = resolve_model(spec)
    return BaseSpec("transformers", src.path, src.name, {"sha": src.sha, "id": src.id})


def _plan_bases(resolved: list[Variant], base: str | bool | None) -> tuple[list[BaseSpec], dict[int, BaseSpec],
                                                                         list[str]]:
    """Which bases to measure, which base each variant (by index) is compared with, and notes."""
    from quantkit.manifest import Manifest

    notes: list[str] = []
    if base is False:
        return [], {}, notes
    given_gguf = given_hf = None
    if base:
        bp = Path(os.path.expanduser(str(base)))
        if bp.suffix == ".gguf":
            if not bp.is_file():
                raise QuantkitError(f"--base {base} does not exist")
            given_gguf = BaseSpec("llama.cpp", bp.resolve(), bp.stem, _gguf_identity(bp))
        else:
            given_hf = _hf_base(str(base))
    specs: dict[str, BaseSpec] = {}
    of: dict[int, BaseSpec] = {}

    def add(b: BaseSpec) -> BaseSpec:
        return specs.setdefault(json.dumps([b.engine, b.role, str(b.path)]), b)

    folder_bases: dict[Path, BaseSpec | None] = {}
    for i, v in enumerate(resolved):
        if v.kind == "gguf":
            if given_gguf:
                of[i] = add(given_gguf)
                continue
            folder = v.manifest_dir
            if folder is not None and folder not in folder_bases:
                try:
                    folder_bases[folder] = _folder_gguf_base(folder)
                except QuantkitError as e:
                    folder_bases[folder] = None
                    notes.append(f"no llama.cpp base for {v.name}: {e}")
            b = folder_bases.get(folder) if folder is not None else None
            if b:
                of[i] = add(b)
            elif folder is None:
                notes.append(f"no llama.cpp base for {v.name}: pass --base with the unquantised (F16/BF16/F32) GGUF")
        else:
            b = given_hf
            if b is None and v.manifest_dir:
                lp = Manifest.load(v.manifest_dir, create=False).base.get("local_path")
                if lp and (Path(lp) / "config.json").is_file():
                    b = _hf_base(lp)
            if b:  # measured in the variant's own engine (vLLM: the base served by the same vLLM)
                b = BaseSpec(engines.get(v.engine).reference, b.path, b.name, b.identity)
            if b:
                of[i] = add(b)
            else:
                notes.append(f"no base for {v.name}: pass --base MODEL to get the gain vs the base")
    if (given_hf and any(v.kind == "gguf" for v in resolved)
            and not any(b.engine == "transformers" and b.path == given_hf.path for b in specs.values())):
        add(BaseSpec("transformers", given_hf.path, given_hf.name, given_hf.identity, role="reference"))
    return list(specs.values()), of, notes


def _cache_path(b: BaseSpec, ctx: dict) -> tuple[Path, dict]:
    hw = ctx["hardware"]
    key = {"v": CACHE_VERSION, "kind": b.engine, "identity": b.identity, "engine": engines.get(b.engine).version(),
           "cpu": hw.get("cpu"), "gpu": hw.get("gpu"), "threads": ctx["threads"],
           "prompt_tokens": ctx["prompt_tokens"], "gen_tokens": ctx["gen_tokens"], "repeats": ctx["repeats"],
           "isolated": ctx["isolate"]}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]
    return cache_home() / "bench" / f"{digest}.json", key


def measure_base(b: BaseSpec, ctx: dict, *, use_cache: bool = True) -> dict:
    """The base's row, from the bench cache when the same base was measured with the same settings, else now."""
    path, key = _cache_path(b, ctx)
    if use_cache and path.is_file():
        try:
            data = json.loads(path.read_text())
            if data.get("key") == key:
                row = data["row"]
                row.update(cached=True, role=b.role, label=b.label)
                return row
        except (OSError, ValueError, KeyError):
            pass  # unreadable: measure again
    size = b.path.stat().st_size if b.kind == "gguf" else _weights_size(b.path)
    base_params = safetensors_stats(b.path)[0] if b.kind != "gguf" else None
    row = _measure(b.engine, b.name, None, b.path, size, ctx, base_params)
    row.update(role=b.role, label=b.label, identity=b.identity, measured_at=now_iso(),
               measurement_id=os.urandom(8).hex(), load_avg_1m=ctx.get("load_avg_1m"))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"key": key, "row": row})
    row["cached"] = False
    return row


def _spread_warnings(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        for what, key in (("prompt", "pp_tps"), ("generation", "tg_tps")):
            mean, sd = r.get(key), r.get(key + "_std")
            if mean and sd and sd > MAX_SPREAD * mean:
                out.append(f"{r['name']}: {what} tok/s varies by ±{100 * sd / mean:.0f}% between repeats (more than "
                           f"{100 * MAX_SPREAD:.0f}% of the mean): the machine is busy; use --threads 1 or a quieter "
                           "machine, or more --repeats")
    return out


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover - not on Linux/macOS
        return None


def bench(variants: list[str], *, prompt_tokens: int = 512, gen_tokens: int = 128, repeats: int = 3,
          base: str | bool | None = None, threads: int | None = None, write_manifest: bool = True,
          isolate: bool = True, use_cache: bool = True, engine: str = "auto") -> BenchReport:
    """Measure each variant in its own engine, and its base in that same engine; see the module docstring.

    ``base``: None = per engine, the base recorded with the variants (GGUF: the unquantised GGUF of their folder;
    HF formats: the base checkpoint, when on disk); a ``.gguf`` file = the llama.cpp base; an HF folder / Hub id =
    the transformers base (and, for GGUF variants, a labelled reference row); False = no base.
    ``isolate=False`` measures in this process. ``use_cache=False`` measures the base again. ``engine``: how HF
    formats run (:func:`quantkit.engines.choose`): in vLLM (served; its base served the same way) or
    transformers."""
    from quantkit.evaluate import assign_engines

    if not variants:
        raise QuantkitError("give at least one VARIANT to benchmark")
    threads = threads or default_threads()
    load_avg = load_average()
    resolved = [v for spec in variants for v in resolve_variants(spec)]
    assign_engines(resolved, engine)  # each HF variant's base is measured in its own engine
    specs, base_of, notes = _plan_bases(resolved, base)
    notes += [f"{v.name}: {v.engine_note}; measured in transformers" for v in resolved if v.engine_note]
    ctx = {"prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "repeats": repeats, "threads": threads,
           "isolate": isolate, "hardware": hardware(threads), "load_avg_1m": load_avg}
    rows_of_base = {id(b): measure_base(b, ctx, use_cache=use_cache) for b in specs}
    bases = [rows_of_base[id(b)] for b in specs]
    base_params = next((safetensors_stats(b.path)[0] for b in specs if b.kind != "gguf"), None)
    rows = []
    for i, v in enumerate(resolved):
        r = _measure(v.engine, v.name, v, v.path, v.size, ctx, base_params)
        b = base_of.get(i)
        if b is not None:
            br = rows_of_base[id(b)]
            r["base"] = br["name"]
            for gain, key, lower_better in GAINS:
                num, den = (br.get(key), r.get(key)) if lower_better else (r.get(key), br.get(key))
                r[gain] = num / den if num and den else None
        rows.append(r)
    warnings = _spread_warnings(bases + rows)
    if load_avg is not None and load_avg > (os.cpu_count() or 1):
        warnings.append(f"the load average was {load_avg:.1f} on {os.cpu_count()} CPUs at the start: other work "
                        "shares the cores, so the speeds are low and noisy")
    for w in warnings:  # also in the report (table, JSON, quantkit.json): info here, not printed twice
        log.info(w)
    context = {"prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "repeats": repeats, "threads": threads,
               "warmup": f"1 pass ({prompt_tokens} prompt + {min(WARMUP_GEN, gen_tokens)} generated tokens)",
               "isolated": isolate, "hardware": ctx["hardware"], "load_avg_1m": load_avg, "time": now_iso()}
    report = BenchReport(rows=rows, bases=bases, context=context, notes=notes, warnings=warnings)
    if write_manifest:
        _write_manifests(report, resolved)
    return report



def _write_manifests(report: BenchReport, resolved: list[Variant]) -> None:
    from quantkit.manifest import Manifest

    c = report.context
    by_dir: dict[Path, list] = {}
    for v, r in zip(resolved, report.rows):
        if v.manifest_dir and v.artifact:
            by_dir.setdefault(v.manifest_dir, []).append((v, r))
    base_rows = {b["name"]: b for b in report.bases if b["role"] == "base"}
    reference = next((b for b in report.bases if b["role"] == "reference"), None)
    for folder, items in by_dir.items():
        m = Manifest.load(folder, create=False)
        for v, r in items:
            if v.artifact not in m.artifacts:
                continue
            m.update_artifact(v.artifact, bench=BenchScore.from_row(
                r, c, base_rows.get(r.get("base")), reference, report.warnings).to_json())
        m.log("bench", variants=[v.artifact for v, _ in items])
        m.save()
