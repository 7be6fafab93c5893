"""``quantkit bench``: speed, size and memory of each variant in its own engine, with the gain vs the base.

* GGUF -> llama.cpp (llama-cpp-python; all layers on the GPU when llama.cpp was built with GPU support);
  HF-format models -> transformers on CUDA when available, else CPU; vLLM instead of transformers when it is
  installed and a GPU is present.
* Each model is measured in its **own child process** (spawned), so its peak memory is its own (peak RSS of
  that process, VmHWM, engine runtime included; plus peak CUDA memory for torch on a GPU) and engines do not share
  thread pools or allocator state.
* One warm-up pass (the full prompt + a few generated tokens), then ``repeats`` timed passes: prompt
  processing = ``prompt_tokens`` ids in one forward pass (tok/s), generation = ``gen_tokens`` greedy tokens one
  at a time on top of that prompt (tok/s). Mean and sample standard deviation over the repeats.
* The prompt is the start of the built-in evaluation text, tokenised by the model's own tokenizer.
* Hardware (CPU model, threads, GPU) is recorded with the numbers so two reports can be compared.
"""

from __future__ import annotations

import math
import os
import resource
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from quantkit.errors import QuantkitError
from quantkit.evaluate import (Variant, _hf_format, _weights_size, default_threads, gguf_tokenize, hardware,
                               resolve_variants)
from quantkit.util import dist_version, format_table, human_size, now_iso, safetensors_tensors

WARMUP_GEN = 4


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


def _timed_runs(once, prompt_tokens: int, gen_tokens: int, repeats: int) -> tuple[list[float], list[float]]:
    """One warm-up, then ``repeats`` timed runs of ``once(n_gen) -> (prompt s, gen s)``: tok/s lists."""
    once(min(WARMUP_GEN, gen_tokens))
    pp, tg = [], []
    for _ in range(repeats):
        a, b = once(gen_tokens)
        pp.append(prompt_tokens / a)
        tg.append(gen_tokens / b)
    return pp, tg


# ------------------------------------------------------------------------------------------ engines (child)
def _prompt_text() -> str:
    from quantkit.texts import builtin_eval_text

    return builtin_eval_text()


def _bench_gguf(path: str, prompt_tokens: int, gen_tokens: int, repeats: int, threads: int) -> dict:
    import ctypes

    import numpy as np
    from llama_cpp import Llama, llama_supports_gpu_offload

    gpu = bool(llama_supports_gpu_offload())
    ids, _ = gguf_tokenize(Path(path), _prompt_text()[:prompt_tokens * 12])
    t0 = time.perf_counter()
    llm = Llama(model_path=path, n_ctx=prompt_tokens + gen_tokens + 16, n_batch=min(prompt_tokens, 2048),
                n_ubatch=min(prompt_tokens, 512), n_threads=threads, n_threads_batch=threads, verbose=False,
                n_gpu_layers=-1 if gpu else 0)
    load_s = time.perf_counter() - t0
    n_vocab = llm.n_vocab()
    if not ids or len(ids) < prompt_tokens:  # llama.cpp could not tokenise the text: any ids do for speed
        ids = [(1000 + 7 * i) % n_vocab for i in range(prompt_tokens)]
    prompt = ids[:prompt_tokens]

    def last_token() -> int:
        logits = np.ctypeslib.as_array(ctypes.cast(llm._ctx.get_logits(), ctypes.POINTER(ctypes.c_float)),
                                       shape=(n_vocab,))
        return int(logits.argmax())

    def once(n_gen: int) -> tuple[float, float]:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        tok = last_token()
        for _ in range(n_gen):
            llm.eval([tok])
            tok = last_token()
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1

    pp, tg = _timed_runs(once, prompt_tokens, gen_tokens, repeats)
    out = {"pp": pp, "tg": tg, "engine": f"llama.cpp (llama-cpp-python {dist_version('llama-cpp-python')})",
           "device": "gpu" if gpu else "cpu", "load_seconds": load_s,
           "params": llm._model.n_params(), "tensor_bytes": llm._model.size(), "desc": llm._model.desc()}
    llm.close()
    return out


def _bench_hf(path: str, prompt_tokens: int, gen_tokens: int, repeats: int, threads: int) -> dict:
    import torch
    from transformers import AutoTokenizer

    from quantkit.evaluate import load_hf_model

    torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        import vllm  # noqa: F401

        if device == "cuda":
            return _bench_vllm(path, prompt_tokens, gen_tokens, repeats)
    except ImportError:
        pass
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(_prompt_text()[:prompt_tokens * 12], add_special_tokens=False).input_ids[:prompt_tokens]
    if len(ids) < prompt_tokens:
        ids = [(1000 + 7 * i) % len(tok) for i in range(prompt_tokens)]
    t0 = time.perf_counter()
    model = load_hf_model(Path(path), device)
    load_s = time.perf_counter() - t0
    prompt = torch.tensor([ids], device=device)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def once(n_gen: int) -> tuple[float, float]:
        with torch.inference_mode():
            sync()
            t0 = time.perf_counter()
            out = model(input_ids=prompt, use_cache=True)
            sync()
            t1 = time.perf_counter()
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            for _ in range(n_gen):
                out = model(input_ids=nxt, past_key_values=past, use_cache=True)
                past = out.past_key_values
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            sync()
            t2 = time.perf_counter()
        return t1 - t0, t2 - t1

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    pp, tg = _timed_runs(once, prompt_tokens, gen_tokens, repeats)
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    return {"pp": pp, "tg": tg, "engine": f"transformers {dist_version('transformers')} ({dtype})",
            "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "load_seconds": load_s,
            "peak_gpu_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None}


def _bench_vllm(path: str, prompt_tokens: int, gen_tokens: int, repeats: int) -> dict:  # pragma: no cover - GPU
    """vLLM path (only with a GPU and vllm installed; not exercised by the CPU test suite)."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(_prompt_text()[:prompt_tokens * 12], add_special_tokens=False).input_ids[:prompt_tokens]
    t0 = time.perf_counter()
    llm = LLM(model=path, max_model_len=prompt_tokens + gen_tokens + 16, enforce_eager=False)
    load_s = time.perf_counter() - t0
    one = SamplingParams(max_tokens=1, temperature=0.0)
    full = SamplingParams(max_tokens=gen_tokens, min_tokens=gen_tokens, ignore_eos=True, temperature=0.0)
    prompt = [{"prompt_token_ids": ids}]

    def once() -> tuple[float, float]:
        t0 = time.perf_counter()
        llm.generate(prompt, one, use_tqdm=False)
        t1 = time.perf_counter()
        llm.generate(prompt, full, use_tqdm=False)
        t2 = time.perf_counter()
        return t1 - t0, max((t2 - t1) - (t1 - t0), 1e-9)

    once()
    pp, tg = [], []
    for _ in range(repeats):
        a, b = once()
        pp.append(len(ids) / a)
        tg.append(gen_tokens / b)
    return {"pp": pp, "tg": tg, "engine": f"vllm {dist_version('vllm')}", "device": "cuda",
            "load_seconds": load_s, "peak_gpu_bytes": None}


def _bench_child(kind: str, path: str, prompt_tokens: int, gen_tokens: int, repeats: int, threads: int) -> dict:
    """Runs in a spawned process: measure one model, return plain data (peak RSS included)."""
    os.environ.setdefault("QUANTKIT_NO_PROGRESS", "1")
    fn = _bench_gguf if kind == "gguf" else _bench_hf
    out = fn(path, prompt_tokens, gen_tokens, repeats, threads)
    out["peak_rss_bytes"] = peak_rss()
    return out


def peak_rss() -> int:
    """Peak resident memory of this process. VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a
    spawned child would report its parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _run_isolated(kind: str, path: Path, prompt_tokens: int, gen_tokens: int, repeats: int, threads: int,
                  isolate: bool) -> dict:
    if not isolate:
        return _bench_child(kind, str(path), prompt_tokens, gen_tokens, repeats, threads)
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as ex:
            return ex.submit(_bench_child, kind, str(path), prompt_tokens, gen_tokens, repeats, threads).result()
    except BrokenProcessPool:
        raise QuantkitError(f"the benchmark process for {path} died (out of memory, or the engine crashed on "
                            "this model); try fewer --prompt-tokens or check the file loads") from None


# ------------------------------------------------------------------------------------------ report
@dataclass
class BenchReport:
    rows: list[dict]
    base: dict | None
    context: dict
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"base": self.base, "variants": self.rows, "context": self.context, "notes": self.notes}

    def table(self) -> str:
        headers = ["model", "engine", "device", "size", "bpw", "pp tok/s", "tg tok/s", "peak mem", "pp gain",
                   "tg gain", "size gain"]

        def fmt(r, is_base=False):
            def g(key):
                v = r.get(key)
                return "" if v is None or is_base else f"{v:.2f}x"

            return [r["name"] + (" (base)" if is_base else ""), r["engine_short"], r["device"],
                    human_size(r["size"]) if r.get("size") else "",
                    f"{r['bits_per_weight']:.2f}" if r.get("bits_per_weight") else "",
                    f"{r['pp_tps']:.1f} ± {r['pp_tps_std']:.1f}", f"{r['tg_tps']:.1f} ± {r['tg_tps_std']:.1f}",
                    human_size(r["peak_memory"]) if r.get("peak_memory") else "",
                    g("pp_gain"), g("tg_gain"), g("size_gain")]

        rows = ([fmt(self.base, True)] if self.base else []) + [fmt(r) for r in self.rows]
        c = self.context
        hw = c["hardware"]
        head = (f"prompt {c['prompt_tokens']} tokens, generate {c['gen_tokens']} tokens, {c['repeats']} repeats "
                f"after a warm-up; {hw['cpu']} ({hw['threads']} threads)" + (f", GPU {hw['gpu']}" if hw.get("gpu") else ""))
        lines = [head, "", format_table(rows, headers)]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _row(name: str, v: Variant | None, kind: str, path: Path, size: int, res: dict, bpw: float | None) -> dict:
    pp, pp_sd = _stats(res["pp"])
    tg, tg_sd = _stats(res["tg"])
    engine = res["engine"]
    return {"name": name, "kind": kind, "path": str(path), "format": v.format if v else "hf",
            "artifact": v.artifact if v else None, "engine": engine,
            "engine_short": engine.split(" ")[0], "device": res["device"], "size": size,
            "bits_per_weight": bpw, "pp_tps": pp, "pp_tps_std": pp_sd, "tg_tps": tg, "tg_tps_std": tg_sd,
            "pp_runs": res["pp"], "tg_runs": res["tg"], "peak_memory": res.get("peak_rss_bytes"),
            "peak_gpu_memory": res.get("peak_gpu_bytes"), "load_seconds": round(res.get("load_seconds", 0), 2)}


def _auto_base(resolved: list[Variant]) -> str | None:
    from quantkit.manifest import Manifest

    seen = set()
    for v in resolved:
        if v.manifest_dir:
            b = Manifest.load(v.manifest_dir, create=False).base
            lp = b.get("local_path")
            if lp and (Path(lp) / "config.json").is_file():
                seen.add(lp)
    return seen.pop() if len(seen) == 1 else None


def bench(variants: list[str], *, prompt_tokens: int = 512, gen_tokens: int = 128, repeats: int = 3,
          base: str | bool | None = None, threads: int | None = None, write_manifest: bool = True,
          isolate: bool = True) -> BenchReport:
    """Measure each variant (and the base, in the same run) in its own engine; see the module docstring.

    ``base``: an HF folder / Hub id; None = the base recorded in the variants' quantkit.json if it is on
    disk; False = no base. ``isolate=False`` measures in this process (peak memory is then the process's)."""
    from quantkit.hub import resolve_model

    if not variants:
        raise QuantkitError("give at least one VARIANT to benchmark")
    threads = threads or default_threads()
    resolved = [v for spec in variants for v in resolve_variants(spec)]
    notes = []
    base_src = None
    if base is None:
        auto = _auto_base(resolved)
        if auto:
            base_src = resolve_model(auto)
        else:
            notes.append("no base measured: pass --base MODEL to get the gain vs the base")
    elif base:
        base_src = resolve_model(str(base))

    base_row = None
    base_params = None
    if base_src is not None:
        base_params, base_bytes = safetensors_stats(base_src.path)
        res = _run_isolated("hf", base_src.path, prompt_tokens, gen_tokens, repeats, threads, isolate)
        base_row = _row(base_src.name, None, "hf", base_src.path, _weights_size(base_src.path), res,
                        base_bytes * 8 / base_params if base_params else None)
    rows = []
    for v in resolved:
        res = _run_isolated(v.kind, v.path, prompt_tokens, gen_tokens, repeats, threads, isolate)
        if v.kind == "gguf":
            bpw = res["tensor_bytes"] * 8 / res["params"] if res.get("params") else v.bits_per_weight
        else:
            params, nbytes = safetensors_stats(v.path)
            if _hf_format(v.path) == "hf" and params:
                bpw = nbytes * 8 / params
            else:
                bpw = v.bits_per_weight or (nbytes * 8 / base_params if base_params else None)
        r = _row(v.name, v, v.kind, v.path, v.size, res, bpw)
        if base_row:
            r["pp_gain"] = r["pp_tps"] / base_row["pp_tps"]
            r["tg_gain"] = r["tg_tps"] / base_row["tg_tps"]
            r["size_gain"] = base_row["size"] / r["size"] if r["size"] else None
            r["memory_gain"] = (base_row["peak_memory"] / r["peak_memory"]) if r.get("peak_memory") else None
        rows.append(r)
    context = {"prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "repeats": repeats, "threads": threads,
               "warmup": f"1 pass ({prompt_tokens} prompt + {min(WARMUP_GEN, gen_tokens)} generated tokens)",
               "isolated": isolate, "hardware": hardware(threads), "time": now_iso()}
    report = BenchReport(rows=rows, base=base_row, context=context, notes=notes)
    if write_manifest:
        _write_manifests(report, resolved)
    return report


def _write_manifests(report: BenchReport, resolved: list[Variant]) -> None:
    from quantkit.manifest import Manifest
    from quantkit.records import BenchScore

    c = report.context
    by_dir: dict[Path, list] = {}
    for v, r in zip(resolved, report.rows):
        if v.manifest_dir and v.artifact:
            by_dir.setdefault(v.manifest_dir, []).append((v, r))
    b = report.base
    for folder, items in by_dir.items():
        m = Manifest.load(folder, create=False)
        for v, r in items:
            if v.artifact not in m.artifacts:
                continue
            m.update_artifact(v.artifact, bench=BenchScore.from_row(r, c, b).to_json())
        m.log("bench", variants=[v.artifact for v, _ in items])
        m.save()
