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
* Each model is measured in its **own child process** (spawned), so engines do not share thread pools or
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

import ctypes
import hashlib
import json
import logging
import math
import os
import re
import resource
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from quantkit.errors import QuantkitError
from quantkit.evaluate import (
    Variant,
    _hf_format,
    _weights_size,
    default_threads,
    gguf_tokenize,
    hardware,
    resolve_variants,
)
from quantkit.records import BenchScore
from quantkit.util import (
    cache_home,
    dist_version,
    format_table,
    human_size,
    now_iso,
    safetensors_tensors,
    write_json_atomic,
)

log = logging.getLogger(__name__)

WARMUP_GEN = 4
MAX_SPREAD = 0.10  # stddev / mean above this -> a warning (busy machine)
CACHE_VERSION = 1
# llama.cpp's load log: "load_tensors:   CPU_Mapped model buffer size =    54.06 MiB", "llama_kv_cache: CPU KV
# buffer size = 1.00 MiB", "llama_context: CPU compute buffer size = 6.02 MiB", "...  output buffer size = ..."
_BUFFER_LINE = re.compile(r"(\S+)\s+(model|KV|RS|compute|output)\s+buffer size\s*=\s*([\d.]+)\s*MiB")


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


def _prompt_ids(tok, prompt_tokens: int) -> list[int]:
    """``prompt_tokens`` ids of the prompt text in the model's own tokenizer (made-up ids when it is short)."""
    ids = tok(_prompt_text()[:prompt_tokens * 12], add_special_tokens=False).input_ids[:prompt_tokens]
    if len(ids) < prompt_tokens:
        ids = [(1000 + 7 * i) % len(tok) for i in range(prompt_tokens)]
    return ids


def _bench_gguf(path: str, prompt_tokens: int, gen_tokens: int, repeats: int, threads: int) -> dict:
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama, llama_supports_gpu_offload

    from quantkit.gguf import _restore_llama_log

    gpu = bool(llama_supports_gpu_offload())
    ids, _ = gguf_tokenize(Path(path), _prompt_text()[:prompt_tokens * 12])
    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def _log(level, text, _user):
        lines.append((text or b"").decode("utf-8", "replace"))

    llama_cpp.llama_log_set(_log, ctypes.c_void_p(0))
    t0 = time.perf_counter()
    try:
        llm = Llama(model_path=path, n_ctx=prompt_tokens + gen_tokens + 16, n_batch=min(prompt_tokens, 2048),
                    n_ubatch=min(prompt_tokens, 512), n_threads=threads, n_threads_batch=threads, verbose=False,
                    n_gpu_layers=-1 if gpu else 0)
    finally:
        _restore_llama_log()
    load_s = time.perf_counter() - t0
    buffers = llama_buffers("".join(lines))
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
           "params": llm._model.n_params(), "tensor_bytes": llm._model.size(), "desc": llm._model.desc(),
           "memory_breakdown": buffers}
    if buffers:
        out["model_memory"] = sum(buffers.values())
        out["peak_memory_method"] = ("llama.cpp buffers (" + " + ".join(buffers) + "), as llama.cpp reports them "
                                     "when it loads the model and creates the context")
    llm.close()
    return out


def llama_buffers(log_text: str) -> dict[str, int]:
    """llama.cpp's load log -> bytes per buffer kind (``model``, ``KV``, ``compute``, ``output``, ``RS``), summed over
    devices (CPU, CPU_Mapped, CPU_REPACK, CUDA0, ...)."""
    out: dict[str, int] = {}
    for _dev, kind, mib in _BUFFER_LINE.findall(log_text):
        out[kind] = out.get(kind, 0) + round(float(mib) * 1024 * 1024)
    return out


def _bench_hf(path: str, prompt_tokens: int, gen_tokens: int, repeats: int, threads: int) -> dict:
    import torch
    from transformers import AutoTokenizer

    from quantkit.evaluate import load_hf_model

    torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ids = _prompt_ids(AutoTokenizer.from_pretrained(path), prompt_tokens)
    rss_before = peak_rss()
    t0 = time.perf_counter()
    model = load_hf_model(Path(path), device)
    load_s = time.perf_counter() - t0
    prompt = torch.tensor([ids], device=device)
    kv_bytes = [0]

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
            kv_bytes[0] = max(kv_bytes[0], tensor_bytes(past))
        return t1 - t0, t2 - t1

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    pp, tg = _timed_runs(once, prompt_tokens, gen_tokens, repeats)
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    weights = tensor_bytes(list(model.parameters()) + list(model.buffers()))
    return {"pp": pp, "tg": tg, "engine": f"transformers {dist_version('transformers')} ({dtype})",
            "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "load_seconds": load_s,
            "peak_gpu_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
            "memory_breakdown": {"weights": weights, "KV": kv_bytes[0]}, "model_memory": weights + kv_bytes[0],
            "peak_memory_method": "transformers: bytes of the parameters and buffers as loaded + the KV cache after "
                                  "the longest pass (activations not counted)",
            "peak_rss_delta": peak_rss() - rss_before}


def tensor_bytes(obj, _seen=None) -> int:
    """Bytes of every distinct torch tensor reachable from ``obj`` (lists, tuples, dicts, cache objects)."""
    import torch

    seen = _seen if _seen is not None else set()
    if isinstance(obj, torch.Tensor):
        key = (obj.data_ptr(), obj.numel(), obj.dtype)
        if key in seen or obj.device.type == "meta":
            return 0
        seen.add(key)
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type) and id(obj) not in seen:
        seen.add(id(obj))  # a cache object (DynamicCache and its layers) holds its tensors in attributes
        return sum(tensor_bytes(v, seen) for v in vars(obj).values())
    return 0


#: Concurrent requests of vLLM's second measurement (serving throughput); the first is one request at a time.
VLLM_CONCURRENCY = 8
_KV_LINE = re.compile(r"KV cache size: ([\d,]+) tokens")
_KV_GIB = re.compile(r"set \(([\d.]+)/[\d.]+\) GiB for KV cache|KV cache space[^\d]*([\d.]+) ?GiB")


def _stream(server, ids: list[int], gen_tokens: int) -> tuple[float, float, int]:
    """One streamed completion on the OpenAI API: (time to first token, time of the last, tokens received)."""
    import urllib.request

    from quantkit.vllm import REQUEST_TIMEOUT, SERVED_NAME

    body = {"model": SERVED_NAME, "prompt": ids, "max_tokens": gen_tokens, "min_tokens": gen_tokens,
            "ignore_eos": True, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    req = urllib.request.Request(f"{server.url}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    first = last = None
    n = 0
    with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            usage = chunk.get("usage") or {}
            if chunk.get("choices") and chunk["choices"][0].get("text") is not None:
                now = time.perf_counter()
                first = first if first is not None else now
                last = now
            n = usage.get("completion_tokens", n)
    if first is None:
        raise QuantkitError("vLLM streamed no tokens")
    return first - t0, last - t0, n


def _bench_vllm(path: str, prompt_tokens: int, gen_tokens: int, repeats: int, threads: int) -> dict:
    """The model served by vLLM (``vllm serve``, shared with verify/eval in this process), measured over its
    OpenAI API as a client sees it: one request at a time (time to first token -> prompt tok/s, then generation
    tok/s), and :data:`VLLM_CONCURRENCY` at once (aggregate generation tok/s)."""
    from concurrent.futures import ThreadPoolExecutor

    import psutil
    from transformers import AutoTokenizer

    from quantkit import vllm

    srv = vllm.server(path, threads=threads)
    ids = _prompt_ids(AutoTokenizer.from_pretrained(path), prompt_tokens)
    _stream(srv, ids, min(WARMUP_GEN, gen_tokens))  # warm-up
    pp, tg, ttft = [], [], []
    for _ in range(repeats):
        t_first, t_last, n = _stream(srv, ids, gen_tokens)
        ttft.append(t_first)
        pp.append(len(ids) / t_first)
        tg.append((n - 1) / (t_last - t_first) if n > 1 and t_last > t_first else float("nan"))
    conc = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with ThreadPoolExecutor(VLLM_CONCURRENCY) as ex:
            outs = list(ex.map(lambda _: _stream(srv, ids, gen_tokens), range(VLLM_CONCURRENCY)))
        conc.append(sum(o[2] for o in outs) / (time.perf_counter() - t0))
    procs = [psutil.Process(srv.proc.pid)]
    procs += procs[0].children(recursive=True)
    rss = sum(p.memory_info().rss for p in procs if p.is_running())
    logtext = srv.log_path.read_text(errors="replace")
    kv_tokens = _KV_LINE.findall(logtext)
    kv_gib = [float(a or b) for a, b in _KV_GIB.findall(logtext)]
    breakdown = {"server_rss": rss}
    if kv_gib:
        breakdown["KV"] = round(kv_gib[-1] * (1 << 30))
    if kv_tokens:
        breakdown["kv_tokens"] = int(kv_tokens[-1].replace(",", ""))
    return {"pp": pp, "tg": tg, "engine": srv.install.label, "device": vllm.device_kind(srv.install),
            "load_seconds": srv.load_seconds or 0.0, "ttft": ttft, "concurrency": VLLM_CONCURRENCY,
            "tg_concurrent": conc, "memory_breakdown": breakdown, "model_memory": rss,
            "peak_memory_method": "vLLM: resident memory of the server's processes after the runs (weights, the KV "
                                  "cache vLLM allocates up front, runtime); KV as vLLM reports it",
            "peak_rss_bytes": rss, "peak_gpu_bytes": None}


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
    if kind == "vllm":  # its own server process already
        return _bench_vllm(str(path), prompt_tokens, gen_tokens, repeats, threads)
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


def _row(name: str, v: Variant | None, kind: str, path: Path, size: int, res: dict, bpw: float | None) -> dict:
    pp, pp_sd = _stats(res["pp"])
    tg, tg_sd = _stats(res["tg"])
    engine = res["engine"]
    return {"name": name, "kind": kind, "path": str(path), "format": v.format if v else kind,
            "artifact": v.artifact if v else None, "engine": engine,
            "engine_short": engine.split(" ")[0], "device": res["device"], "size": size,
            "bits_per_weight": bpw, "pp_tps": pp, "pp_tps_std": pp_sd, "tg_tps": tg, "tg_tps_std": tg_sd,
            "pp_runs": res["pp"], "tg_runs": res["tg"],
            "peak_memory": res.get("model_memory") or res.get("peak_rss_bytes"),
            "peak_memory_method": res.get("peak_memory_method") or "peak RSS of the benchmark process (VmHWM)",
            "memory_breakdown": res.get("memory_breakdown"), "peak_rss": res.get("peak_rss_bytes"),
            "peak_gpu_memory": res.get("peak_gpu_bytes"), "load_seconds": round(res.get("load_seconds", 0), 2),
            **({"ttft_s": _stats(res["ttft"])[0], "concurrency": res["concurrency"],
                "tg_tps_concurrent": _stats(res["tg_concurrent"])[0],
                "tg_tps_concurrent_std": _stats(res["tg_concurrent"])[1]} if "ttft" in res else {})}


def _measure(kind: str, name: str, v: Variant | None, path: Path, size: int, ctx: dict,
             base_params: int | None = None) -> dict:
    """Run one model in its engine (own process unless ``ctx['isolate']`` is false) -> its row."""
    res = _run_isolated(kind, path, ctx["prompt_tokens"], ctx["gen_tokens"], ctx["repeats"], ctx["threads"],
                        ctx["isolate"])
    if kind == "gguf":
        bpw = res["tensor_bytes"] * 8 / res["params"] if res.get("params") else (v.bits_per_weight if v else None)
    else:
        params, nbytes = safetensors_stats(path)
        if _hf_format(path) == "hf" and params:
            bpw = nbytes * 8 / params
        else:
            bpw = (v.bits_per_weight if v else None) or (nbytes * 8 / base_params if base_params else None)
    return _row(name, v, kind, path, size, res, bpw)


# ------------------------------------------------------------------------------------------ bases
@dataclass
class BaseSpec:
    """One base to measure: which engine (``kind``), which file/folder, and what identifies it for the cache."""

    kind: str  # "gguf" | "hf"
    path: Path
    name: str
    identity: dict
    role: str = "base"  # "base" (gains are computed against it) | "reference" (shown, labelled, no gains)

    @property
    def label(self) -> str:
        if self.role == "reference":
            return "reference: base in transformers"
        return {"gguf": "base, llama.cpp", "vllm": "base, vLLM"}.get(self.kind, "base, transformers")


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
    return BaseSpec("gguf", path, path.stem, _gguf_identity(path, rec))


def _hf_base(spec: str) -> BaseSpec:
    from quantkit.hub import resolve_model

    src = resolve_model(spec)
    return BaseSpec("hf", src.path, src.name, {"sha": src.sha, "id": src.id})


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
            given_gguf = BaseSpec("gguf", bp.resolve(), bp.stem, _gguf_identity(bp))
        else:
            given_hf = _hf_base(str(base))
    specs: dict[str, BaseSpec] = {}
    of: dict[int, BaseSpec] = {}

    def add(b: BaseSpec) -> BaseSpec:
        return specs.setdefault(json.dumps([b.kind, b.role, str(b.path)]), b)

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
            if b and v.engine == "vllm":
                b = BaseSpec("vllm", b.path, b.name, b.identity)
            if b:
                of[i] = add(b)
            else:
                notes.append(f"no base for {v.name}: pass --base MODEL to get the gain vs the base")
    if (given_hf and any(v.kind == "gguf" for v in resolved)
            and not any(b.kind == "hf" and b.path == given_hf.path for b in specs.values())):
        add(BaseSpec("hf", given_hf.path, given_hf.name, given_hf.identity, role="reference"))
    return list(specs.values()), of, notes


def _engine_version(kind: str) -> str:
    if kind == "gguf":
        return f"llama-cpp-python {dist_version('llama-cpp-python')}"
    if kind == "vllm":
        from quantkit.vllm import installed_label

        return f"{installed_label() or 'vLLM'}, concurrency {VLLM_CONCURRENCY}"
    return f"transformers {dist_version('transformers')}, torch {dist_version('torch')}"


def _cache_path(b: BaseSpec, ctx: dict) -> tuple[Path, dict]:
    hw = ctx["hardware"]
    key = {"v": CACHE_VERSION, "kind": b.kind, "identity": b.identity, "engine": _engine_version(b.kind),
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
    row = _measure(b.kind, b.name, None, b.path, size, ctx, base_params)
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
    formats run (:func:`quantkit.evaluate.hf_engine`): in vLLM (served; its base served the same way) or
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
        r = _measure("vllm" if v.engine == "vllm" else v.kind, v.name, v, v.path, v.size, ctx, base_params)
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
