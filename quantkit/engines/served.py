"""vLLM, as users run it: ``vllm serve DIR`` (one server per model, shared in a process: :mod:`quantkit.vllm`),
spoken to over its OpenAI API. Scoring gives the top :data:`quantkit.vllm.MAX_LOGPROBS` log-probabilities of
every prompt position (``sparse``), not logits; speed is measured as a client sees it, at one request and at
:data:`VLLM_CONCURRENCY` at once; tasks go through lm-eval's own OpenAI-compatible completions model.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

from quantkit import trust, vllm
from quantkit.engines import WARMUP_GEN, Engine, Session, lm_eval_template, prompt_ids
from quantkit.errors import QuantkitError

#: Concurrent requests of vLLM's second measurement (serving throughput); the first is one request at a time.
VLLM_CONCURRENCY = 8
_KV_LINE = re.compile(r"KV cache size: ([\d,]+) tokens")
_KV_GIB = re.compile(r"set \(([\d.]+)/[\d.]+\) GiB for KV cache|KV cache space[^\d]*([\d.]+) ?GiB")


class VLLMSession(Session):
    """An HF-format model served by vLLM; :meth:`score` returns per position ``{token id: logprob}``."""

    sparse = True
    max_k = vllm.MAX_LOGPROBS

    def __init__(self, path: Path, threads: int | None):
        self.server = vllm.server(path, threads=threads)
        self.label = f"{self.server.install.label.replace(')', '')}, {vllm.device_kind(self.server.install)})"
        self.load_seconds = self.server.load_seconds

    def score(self, window: list[int], k: int | None = None) -> list[dict]:
        return self.server.prompt_logprobs(window, k or self.max_k)

    def generate(self, ids: list[int], max_tokens: int) -> list[int]:
        """Greedy continuation (temperature 0) as token ids (vLLM's ``return_token_ids``)."""
        out = self.server.post("/v1/completions", {
            "model": vllm.SERVED_NAME, "prompt": list(ids), "max_tokens": int(max_tokens), "temperature": 0.0,
            "return_token_ids": True})
        return [int(t) for t in out["choices"][0].get("token_ids") or []]

    def close(self):  # the server stays up for the other stages (verify, eval, bench); stopped at exit
        self.server = None


def _stream(server, ids: list[int], gen_tokens: int) -> tuple[float, float, int]:
    """One streamed completion on the OpenAI API: (time to first token, time of the last, tokens received)."""
    import urllib.request

    body = {"model": vllm.SERVED_NAME, "prompt": ids, "max_tokens": gen_tokens, "min_tokens": gen_tokens,
            "ignore_eos": True, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    req = urllib.request.Request(f"{server.url}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    first = last = None
    n = 0
    with urllib.request.urlopen(req, timeout=vllm.REQUEST_TIMEOUT) as r:
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


def _speed(path: str, prompt_tokens: int, gen_tokens: int, repeats: int, threads: int) -> dict:
    """The model served by vLLM (``vllm serve``, shared with verify/eval in this process), measured over its
    OpenAI API as a client sees it: one request at a time (time to first token -> prompt tok/s, then generation
    tok/s), and :data:`VLLM_CONCURRENCY` at once (aggregate generation tok/s)."""
    from concurrent.futures import ThreadPoolExecutor

    import psutil
    from transformers import AutoTokenizer

    srv = vllm.server(path, threads=threads)
    ids = prompt_ids(AutoTokenizer.from_pretrained(path, **trust.hf_kwargs()), prompt_tokens)
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


class VLLM(Engine):
    name = "vllm"
    short = "vLLM"
    kind = "hf"
    reference = "vllm"  # compared with the base served by the same vLLM
    in_process = True   # its own server process already

    def can_run(self, path, adapter=None):
        if adapter is not None:
            return False, "a run-time LoRA adapter is applied in transformers (PEFT)"
        return vllm.can_run(path)

    def open(self, path, *, ctx, threads, adapter=None):
        return VLLMSession(Path(path), threads)

    def tokens(self, path, text):
        from quantkit.engines.hf import own_tokens

        return own_tokens(path, text)  # vLLM tokenises with the folder's own files

    def speed(self, path, prompt_tokens, gen_tokens, repeats, threads):
        return _speed(str(path), prompt_tokens, gen_tokens, repeats, threads)

    def task_lm(self, path, *, base_tokenizer, base_path, max_length, threads, batch_size=1):
        """lm-eval's own OpenAI-compatible completions model (``local-completions``) against the server of
        ``path``: requests go as token ids of the base tokenizer; log-likelihoods come from the prompt's
        log-probabilities (``echo``), generation from the server."""
        srv = vllm.server(path, threads=threads)
        logging.getLogger("lm_eval.models.api_models").setLevel(logging.ERROR)
        lm = make_completions_lm()(base_url=f"{srv.url}/v1/completions", model=vllm.SERVED_NAME,
                                 tokenizer=str(base_path), tokenizer_backend="huggingface", tokenized_requests=True,
                                 max_length=max_length, num_concurrent=1, max_retries=1,
                                 timeout=int(vllm.REQUEST_TIMEOUT))
        lm.engine = f"{srv.install.label} (served; lm-eval local-completions)"
        return lm

    def version(self) -> str:
        return f"{vllm.installed_label() or 'vLLM'}, concurrency {VLLM_CONCURRENCY}"


#: The OpenAI completions schema vLLM validates allows at most this many ``stop`` strings.
MAX_STOP = 4


def make_completions_lm():
    """lm-eval's ``LocalCompletionsAPI``, with a task's stop strings beyond :data:`MAX_STOP` applied here: the
    server stops at the first four (and at EOS), the text is cut at every one of them, as the other engines do
    (vLLM answers 400 to a request with five)."""
    lm_eval_template()
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.models.utils import handle_stop_sequences, postprocess_generated_text

    class CompletionsLM(LocalCompletionsAPI):
        def _create_payload(self, messages, generate=False, gen_kwargs=None, seed=1234, eos=None, **kwargs):
            body = super()._create_payload(messages, generate=generate, gen_kwargs=gen_kwargs, seed=seed, eos=eos,
                                           **kwargs)
            if generate and isinstance(body.get("stop"), list):
                body["stop"] = body["stop"][:MAX_STOP]
            return body

        def generate_until(self, requests, disable_tqdm: bool = False):
            outs = super().generate_until(requests, disable_tqdm=disable_tqdm)
            return [postprocess_generated_text(o, handle_stop_sequences(r.args[1].get("until"), None), None)
                    if isinstance(o, str) else o for o, r in zip(outs, requests)]

    return CompletionsLM

