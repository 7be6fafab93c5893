"""llama.cpp (llama-cpp-python): a GGUF runs in llama.cpp's own kernels, never a dequantised copy.

Scoring loads the file with ``logits_all=True`` (every position's logits, a view of llama.cpp's buffer); speed
is measured on one context (prompt in one batch, then one token at a time), its memory from llama.cpp's own
buffer sizes in its load log; tasks go through :class:`GGUFLM`, lm-eval's ``TemplateLM`` over the same kernels.
"""

from __future__ import annotations

import ctypes
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from quantkit.engines import (
    Engine,
    Session,
    cuda_available,
    lm_eval_template,
    prompt_text,
    timed_runs,
)
from quantkit.errors import QuantkitError
from quantkit.ggufio import _restore_llama_log, read_gguf_header
from quantkit.util import atomic_path, cache_home, default_threads, dist_version, progress, sha256_bytes

# llama.cpp's load log: "load_tensors:   CPU_Mapped model buffer size =    54.06 MiB", "llama_kv_cache: CPU KV
# buffer size = 1.00 MiB", "llama_context: CPU compute buffer size = 6.02 MiB", "...  output buffer size = ..."
_BUFFER_LINE = re.compile(r"(\S+)\s+(model|KV|RS|compute|output)\s+buffer size\s*=\s*([\d.]+)\s*MiB")

_TOKENIZE_CHILD = """
import json, sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)
ids = llm.tokenize(sys.stdin.buffer.read(), add_bos=False, special=False)
sys.stdout.write(json.dumps(ids))
sys.stdout.flush()
llm.close()
"""


def label() -> str:
    return f"llama.cpp (llama-cpp-python {dist_version('llama-cpp-python')})"


def gguf_tokenize(path: Path, text: str) -> tuple[list[int] | None, str | None]:
    """llama.cpp's own token ids for ``text`` (vocab only, in a child process: a broken vocabulary makes
    llama.cpp abort the whole process, e.g. a byte token missing from a mis-converted BPE vocab).

    Kept under quantkit's cache by the sha256 of the file's ``tokenizer.*`` metadata, the text and llama.cpp's
    version: every type made from one intermediate has the same vocabulary, so a set of variants (and every
    verify and re-run) starts the child once per text."""
    kv, _ = read_gguf_header(path, digest="tokenizer.")
    key = sha256_bytes(json.dumps([kv["tokenizer.*sha256"], kv.get("general.architecture"),
                                   sha256_bytes(text.encode("utf-8")),
                                   dist_version("llama_cpp_python")]).encode())
    cached = cache_home() / "tokenize" / f"{key[:32]}.json"
    try:
        return json.loads(cached.read_text()), None
    except (OSError, ValueError):
        pass
    r = subprocess.run([sys.executable, "-c", _TOKENIZE_CHILD, str(path)], input=text.encode("utf-8"),
                       capture_output=True)
    if r.returncode != 0:
        tail = [ln for ln in r.stderr.decode(errors="replace").splitlines() if ln.strip()][-1:] or ["no output"]
        return None, f"llama.cpp's tokenizer failed on this text ({tail[0][:120]})"
    ids = json.loads(r.stdout)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cached) as tmp:
            tmp.write_text(json.dumps(ids))
    except OSError:  # a read-only cache only costs the child next time
        pass
    return ids, None


class GGUFSession(Session):
    """A GGUF loaded for scoring: every position's logits (``logits_all=True``)."""

    def __init__(self, path: Path, ctx: int, threads: int | None, lora: Path | None = None):
        try:
            from llama_cpp import Llama
        except ImportError:
            raise QuantkitError("llama-cpp-python is not installed: run scripts/install.sh") from None
        th = threads or default_threads()
        self.ctx = ctx
        try:
            self.llm = Llama(model_path=str(path), n_ctx=ctx, n_batch=ctx, n_ubatch=min(ctx, 512),
                             logits_all=True, n_threads=th, n_threads_batch=th, verbose=False,
                             n_gpu_layers=-1 if cuda_available() else 0,
                             lora_path=str(lora) if lora else None)
        except Exception as e:
            raise QuantkitError(f"llama.cpp could not load {path} ({e}): is it a complete GGUF file?") from None
        self.label = label()

    def score(self, window: list[int], k: int | None = None):
        import numpy as np
        import torch

        self.llm.reset()
        self.llm.eval(window)
        # a view of llama-cpp-python's logit buffer (no copy): valid until the next eval()
        return torch.from_numpy(np.ascontiguousarray(self.llm.scores[:len(window)], dtype=np.float32))

    def generate(self, ids: list[int], max_tokens: int) -> list[int]:
        """Greedy continuation of ``ids`` (the argmax of each next position), at most ``max_tokens`` ids."""
        import numpy as np

        self.llm.reset()
        self.llm.eval(list(ids))
        out: list[int] = []
        eos = self.llm.token_eos()
        for _ in range(max_tokens):
            tok = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            out.append(tok)
            if tok == eos or self.llm.n_tokens >= self.ctx:
                break
            self.llm.eval([tok])
        return out

    def close(self):
        try:
            self.llm.close()
        except Exception:
            pass
        self.llm = None


def llama_buffers(log_text: str) -> dict[str, int]:
    """llama.cpp's load log -> bytes per buffer kind (``model``, ``KV``, ``compute``, ``output``, ``RS``), summed over
    devices (CPU, CPU_Mapped, CPU_REPACK, CUDA0, ...)."""
    out: dict[str, int] = {}
    for _dev, kind, mib in _BUFFER_LINE.findall(log_text):
        out[kind] = out.get(kind, 0) + round(float(mib) * 1024 * 1024)
    return out


def _speed(path: str, prompt_tokens: int, gen_tokens: int, repeats: int, threads: int) -> dict:
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama, llama_supports_gpu_offload

    gpu = bool(llama_supports_gpu_offload())
    ids, _ = gguf_tokenize(Path(path), prompt_text()[:prompt_tokens * 12])
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

    pp, tg = timed_runs(once, prompt_tokens, gen_tokens, repeats)
    out = {"pp": pp, "tg": tg, "engine": label(), "device": "gpu" if gpu else "cpu", "load_seconds": load_s,
           "params": llm._model.n_params(), "tensor_bytes": llm._model.size(), "desc": llm._model.desc(),
           "memory_breakdown": buffers}
    if buffers:
        out["model_memory"] = sum(buffers.values())
        out["peak_memory_method"] = ("llama.cpp buffers (" + " + ".join(buffers) + "), as llama.cpp reports them "
                                     "when it loads the model and creates the context")
    llm.close()
    return out


class LlamaCpp(Engine):
    name = short = "llama.cpp"
    kind = "gguf"
    reference = "transformers"  # a GGUF is compared with the HF base's own distribution

    def open(self, path, *, ctx, threads, adapter=None):
        return GGUFSession(Path(path), ctx, threads, adapter)

    def tokens(self, path, text):
        return gguf_tokenize(Path(path), text)

    def speed(self, path, prompt_tokens, gen_tokens, repeats, threads):
        return _speed(str(path), prompt_tokens, gen_tokens, repeats, threads)

    def task_lm(self, path, *, base_tokenizer, base_path, max_length, threads, batch_size=1):
        # a GGUF is fed the base tokenizer's ids, so base and variant differ only in weights and kernels
        return make_gguf_lm()(path, tokenizer=base_tokenizer, max_length=max_length, threads=threads)

    def version(self) -> str:
        return f"llama-cpp-python {dist_version('llama-cpp-python')}"


def make_gguf_lm():
    """The class :class:`GGUFLM` (made on first use: lm-eval is an optional extra)."""
    TemplateLM = lm_eval_template()

    class GGUFLM(TemplateLM):
        """lm-eval ``LM`` over llama.cpp: log-likelihoods from its kernels (:class:`GGUFSession`), tokens from the
        base's HF tokenizer (``tokenizer``) or, without one, from llama.cpp's own tokenizer."""

        backend = "causal"

        def __init__(self, path, tokenizer=None, max_length: int = 2048, threads: int | None = None):
            super().__init__()
            self.path = Path(path)
            self._max_length = int(max_length)
            # lm-eval feeds at most max_length tokens (the last of max_length + 1 is only a target)
            self.scorer = GGUFSession(self.path, self._max_length, threads)
            self.engine = self.scorer.label
            self.hf_tokenizer = tokenizer
            self.llm_tokens = None  # the token ids whose logits sit in llama.cpp's buffer (prefix reuse)

        # -- tokens
        @property
        def eot_token_id(self) -> int:
            if self.hf_tokenizer is not None:
                return self.hf_tokenizer.eos_token_id
            return self.scorer.llm.token_eos()

        @property
        def prefix_token_id(self) -> int:
            if self.hf_tokenizer is not None:
                bos = self.hf_tokenizer.bos_token_id
                return bos if bos is not None else self.hf_tokenizer.eos_token_id
            bos = self.scorer.llm.token_bos()
            return bos if bos is not None and bos >= 0 else self.scorer.llm.token_eos()

        @property
        def max_length(self) -> int:
            return self._max_length

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
            if self.hf_tokenizer is not None:
                kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
                return list(self.hf_tokenizer.encode(string, **kw))
            from llama_cpp import llama_vocab_get_add_bos

            add_bos = add_special_tokens
            if add_bos is None:
                add_bos = bool(llama_vocab_get_add_bos(self.scorer.llm._model.vocab))
            return self.scorer.llm.tokenize(string.encode("utf-8"), add_bos=add_bos, special=True)

        def tok_decode(self, tokens, **kwargs) -> str:
            if self.hf_tokenizer is not None:
                return self.hf_tokenizer.decode(tokens)
            return self.scorer.llm.detokenize(tokens).decode("utf-8", errors="replace")

        # -- scoring
        def logits(self, tokens: list[int]):
            """Logits [len(tokens), vocab] for ``tokens``; the KV cache of a shared prefix with the previous call
            is kept (positions before it need no recomputation: a position's logits depend only on the tokens
            up to it)."""
            import numpy as np
            import torch

            self._eval(tokens)
            return torch.from_numpy(np.array(self.scorer.llm.scores[:len(tokens)], dtype=np.float32))

        def _eval(self, tokens: list[int]) -> None:
            """Bring llama.cpp's context to ``tokens``, evaluating only what follows the prefix it already holds."""
            llm = self.scorer.llm
            if len(tokens) > llm.n_ctx():
                raise QuantkitError(f"{len(tokens)} tokens exceed the context of {llm.n_ctx()}")
            common = 0
            prev = self.llm_tokens or []
            for a, b in zip(prev, tokens):
                if a != b:
                    break
                common += 1
            common = min(common, len(tokens) - 1)  # evaluate at least one token
            llm.n_tokens = common
            llm.eval(tokens[common:])
            self.llm_tokens = list(tokens)

        def _score(self, context_enc: list[int], continuation_enc: list[int]) -> tuple[float, bool]:
            import torch

            # as lm-eval's HFLM: the last max_length+1 tokens, the final one only as a target
            whole = (context_enc + continuation_enc)[-(self._max_length + 1):]
            inp = whole[:-1]
            n = len(continuation_enc)
            logits = self.logits(inp)[len(inp) - n:].double()
            logp = torch.log_softmax(logits, dim=-1)
            target = torch.tensor(continuation_enc, dtype=torch.long)
            ll = float(logp.gather(1, target[:, None]).sum())
            greedy = bool((logp.argmax(-1) == target).all())
            return ll, greedy

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
            # Sorted by tokens so requests sharing a context are adjacent (KV prefix reuse); answered in order.
            order = sorted(range(len(requests)), key=lambda i: requests[i][1] + requests[i][2])
            out: list[tuple[float, bool] | None] = [None] * len(requests)
            for i in progress(order, desc=f"{self.path.name} (llama.cpp)", unit="req", disable=disable_tqdm):
                _, ctx_enc, cont_enc = requests[i]
                out[i] = self._score(list(ctx_enc), list(cont_enc))
            return out  # type: ignore[return-value]

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            from lm_eval import utils

            out = []
            for (string,) in [r.args for r in requests]:
                windows = map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self._max_length, context_len=1))
                out.append(sum(self._score(list(c), list(t))[0] for c, t in windows))
            return out

        # -- generation
        @property
        def max_gen_toks(self) -> int:
            return 256  # lm-eval's default (HFLM's too)

        def _greedy(self, context: list[int], max_gen_toks: int, until: list[str]) -> list[int]:
            """Greedy tokens after ``context`` until a stop string appears in the decoded text, EOS, or
            ``max_gen_toks``; the KV cache of the prefix shared with the previous request is kept (few-shot
            prompts share their examples)."""
            import numpy as np

            llm = self.scorer.llm
            self._eval(context)  # evaluates only what is new since the previous request
            out: list[int] = []
            eos = self.eot_token_id
            while len(out) < max_gen_toks and llm.n_tokens < llm.n_ctx():
                tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                if tok == eos:
                    break
                out.append(tok)
                if until and any(s and s in self.tok_decode(out) for s in until):
                    break
                llm.eval([tok])
                self.llm_tokens.append(tok)
            return out

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            """lm-eval's ``generate_until``, as its ``HFLM`` does it: greedy (a task asking for sampling is
            refused), the task's ``until`` strings plus EOS as stops, ``max_gen_toks`` (default 256), the context
            left-truncated to ``max_length - max_gen_toks`` tokens of the base tokenizer, the text cut at the first
            stop string. Requests run in order of their context, so shared few-shot prefixes stay in the KV cache.
            """
            from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

            args = [r.args for r in requests]
            out: list[str | None] = [None] * len(args)
            eos = self.tok_decode([self.eot_token_id])
            for i in progress(sorted(range(len(args)), key=lambda i: args[i][0]), desc=f"{self.path.name} "
                              "(llama.cpp, generate)", unit="req", disable=disable_tqdm):
                context, gen_kwargs = args[i]
                kw = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
                if kw.get("do_sample") and kw.get("temperature", 0) > 0:
                    raise QuantkitError("a task asks for sampled generation (do_sample with a temperature): "
                                        "quantkit's llama.cpp adapter generates greedily, as recovery needs")
                until = handle_stop_sequences(kw.pop("until", None), eos=eos)
                n = int(kw.pop("max_gen_toks"))
                if n >= self._max_length:
                    raise QuantkitError(f"max_gen_toks {n} must be below the context of {self._max_length}")
                ctx = self.tok_encode(context)[-(self._max_length - n):]
                out[i] = postprocess_generated_text(self.tok_decode(self._greedy(ctx, n, until)), until, None)
            return out  # type: ignore[return-value]

        # -- chat templates (lm-eval's --apply_chat_template): the base tokenizer's template
        @property
        def tokenizer_name(self) -> str:
            tok = self.hf_tokenizer
            return getattr(tok, "name_or_path", None) or str(self.path)

        def chat_template(self, chat_template: bool | str = False) -> str | None:
            tok = self.hf_tokenizer
            return (getattr(tok, "chat_template", None) or "") if chat_template else None

        def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
            if self.hf_tokenizer is None or not getattr(self.hf_tokenizer, "chat_template", None):
                raise QuantkitError(f"{self.path.name}: the base tokenizer has no chat template")
            return self.hf_tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                         add_generation_prompt=add_generation_prompt)

        def close(self):
            self.scorer.close()

    return GGUFLM
