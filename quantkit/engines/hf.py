"""transformers: an HF folder (the base, AWQ, GPTQ, compressed-tensors) loaded as its loader wants it: fp32 on
CPU, the loader's own dtype on CUDA, a PEFT adapter applied at run time. Scoring gives full logits; tasks go
through lm-eval's own ``HFLM`` around the same model.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from quantkit import trust
from quantkit.engines import Engine, Session, cuda_available, lm_eval_template, peak_rss, prompt_ids, timed_runs
from quantkit.errors import QuantkitError
from quantkit.util import dist_version

#: files that mean a folder brings its own tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def device() -> str:
    return "cuda" if cuda_available() else "cpu"


def hf_format(folder: Path) -> str:
    """The quantisation format an HF folder's config declares (``quant_method``; ``hf`` when none)."""
    try:
        cfg = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return "hf"
    qc = cfg.get("quantization_config") or {}
    return str(qc.get("quant_method") or "hf") if qc else "hf"


def load_hf_model(path: Path, device_name: str | None = None):
    """A transformers model for scoring: fp32 on CPU; quantised formats as their loader wants them."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if os.environ.get("QUANTKIT_NO_PROGRESS"):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    device_name = device_name or device()
    fmt = hf_format(path)
    tries = [torch.float32 if device_name == "cpu" else "auto", "auto"]
    last = None
    for dtype in tries:
        try:
            model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_name,
                                                               output_loading_info=True, **trust.hf_kwargs())
        except ImportError as e:
            raise QuantkitError(f"{path} is a {fmt} model and transformers cannot load it here ({e}); install "
                                "quantkit with scripts/install.sh") from None
        except Exception as e:  # try the loader's own dtype once
            last = e
            continue
        problem = load_problem(info)
        if problem:
            raise QuantkitError(f"transformers loaded {path} ({fmt}) with {problem}: the folder does not hold the "
                                "model its config describes (rebuild it; a weight left at its initial value "
                                "makes every number measured on it wrong)")
        model.eval()
        return model
    raise QuantkitError(f"transformers could not load {path} ({fmt}): {type(last).__name__}: "
                        f"{str(last).splitlines()[0] if str(last) else ''}")


def load_problem(info: dict) -> str | None:
    """What transformers' loading report (``output_loading_info=True``) says went wrong, in a few words: weights
    the model needs that the folder lacks (left at their initial values), tensors in the folder the model has no
    place for (never loaded), tensors of the wrong shape; None when every weight was loaded."""
    parts = []
    for key, what in (("missing_keys", "missing"), ("unexpected_keys", "unexpected"),
                      ("mismatched_keys", "of the wrong shape")):
        names = sorted(str(k[0] if isinstance(k, tuple) else k) for k in (info.get(key) or ()))
        if names:
            more = f" and {len(names) - 2} more" if len(names) > 2 else ""
            parts.append(f"{len(names)} weight{'s' if len(names) > 1 else ''} {what} ({', '.join(names[:2])}{more})")
    return "; ".join(parts) or None


def _dtype(model) -> str:
    try:
        return str(next(model.parameters()).dtype).replace("torch.", "")
    except StopIteration:  # pragma: no cover
        return "?"


class HFSession(Session):
    def __init__(self, path: Path, threads: int | None, adapter: Path | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.device = device()
        self.model = load_hf_model(path, self.device)
        if adapter is not None:
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.model, adapter).eval()
        self.label = f"transformers {dist_version('transformers')} ({self.device}, {_dtype(self.model)})"

    def score(self, window: list[int], k: int | None = None):
        import torch

        with torch.inference_mode():
            ids = torch.tensor([window], device=self.device)
            return self.model(input_ids=ids, use_cache=False).logits[0].float().cpu()

    def generate(self, ids: list[int], max_tokens: int) -> list[int]:
        import torch

        with torch.inference_mode():
            out = self.model.generate(torch.tensor([list(ids)], device=self.device), max_new_tokens=max_tokens,
                                      do_sample=False, num_beams=1)
        return [int(t) for t in out[0, len(ids):]]

    def close(self):
        self.model = None


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


def _speed(path: str, prompt_tokens: int, gen_tokens: int, repeats: int, threads: int) -> dict:
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(threads)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ids = prompt_ids(AutoTokenizer.from_pretrained(path, **trust.hf_kwargs()), prompt_tokens)
    rss_before = peak_rss()
    t0 = time.perf_counter()
    model = load_hf_model(Path(path), dev)
    load_s = time.perf_counter() - t0
    prompt = torch.tensor([ids], device=dev)
    kv_bytes = [0]

    def sync():
        if dev == "cuda":
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

    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    pp, tg = timed_runs(once, prompt_tokens, gen_tokens, repeats)
    weights = tensor_bytes(list(model.parameters()) + list(model.buffers()))
    return {"pp": pp, "tg": tg, "engine": f"transformers {dist_version('transformers')} ({_dtype(model)})",
            "device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu", "load_seconds": load_s,
            "peak_gpu_bytes": torch.cuda.max_memory_allocated() if dev == "cuda" else None,
            "memory_breakdown": {"weights": weights, "KV": kv_bytes[0]}, "model_memory": weights + kv_bytes[0],
            "peak_memory_method": "transformers: bytes of the parameters and buffers as loaded + the KV cache after "
                                  "the longest pass (activations not counted)",
            "peak_rss_delta": peak_rss() - rss_before}


def own_tokens(path: Path, text: str) -> tuple[list[int] | None, str | None]:
    """The folder's own tokenizer's ids for ``text``: ``(None, None)`` when it ships none, ``(None, reason)`` when
    it does not load (used by transformers and vLLM alike: both tokenise with the folder's files)."""
    path = Path(path)
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        return None, None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path, **trust.hf_kwargs())
        return list(tok(text, add_special_tokens=False).input_ids), None
    except Exception as e:
        return None, f"its tokenizer does not load: {type(e).__name__}"


class Transformers(Engine):
    name = short = "transformers"
    kind = "hf"
    reference = "transformers"

    def open(self, path, *, ctx, threads, adapter=None):
        return HFSession(Path(path), threads, adapter)

    def open_reference(self, path, *, ctx, threads):
        """The fp32 base a layer at a time (bounded memory, :mod:`quantkit.engines.hf_stream`) when its
        parameters are its checkpoint's tensors, else loaded whole."""
        from quantkit.engines.hf_stream import NotStreamable, StreamedSession

        try:
            return StreamedSession(Path(path), threads)
        except NotStreamable:
            return HFSession(Path(path), threads)

    def tokens(self, path, text):
        return own_tokens(path, text)

    def speed(self, path, prompt_tokens, gen_tokens, repeats, threads):
        return _speed(str(path), prompt_tokens, gen_tokens, repeats, threads)

    def task_lm(self, path, *, base_tokenizer, base_path, max_length, threads, batch_size=1):
        """lm-eval's own ``HFLM`` around the model quantkit loads for scoring (fp32 on CPU), with the folder's
        own tokenizer when it ships one, else the base's."""
        lm_eval_template()
        import torch
        from lm_eval.models.huggingface import HFLM

        tok = base_tokenizer
        if Path(path) != Path(base_path) and any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(path, **trust.hf_kwargs())
        if threads:
            torch.set_num_threads(threads)
        dev = device()
        model = load_hf_model(Path(path), dev)
        # HFLM warns that a model object (not a name) was passed: that is deliberate here
        logging.getLogger("lm_eval.models.huggingface").setLevel(logging.ERROR)
        lm = HFLM(pretrained=model, tokenizer=tok, max_length=max_length, batch_size=batch_size, device=dev)
        lm.engine = f"transformers {dist_version('transformers')} ({dev}, {_dtype(model)})"
        return lm

    def version(self) -> str:
        return f"transformers {dist_version('transformers')}, torch {dist_version('torch')}"
