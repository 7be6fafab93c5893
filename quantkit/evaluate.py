"""``quantkit eval``: what each variant loses against its base, measured on one token stream.

How it works
------------
* The evaluation text (default: :func:`quantkit.texts.builtin_eval_text`, never the calibration text) is
  tokenised **once** with the base model's tokenizer. Every variant, whatever its format, is scored on exactly
  those token ids, cut into the same **non-overlapping windows** of ``ctx`` tokens (the base tokenizer's BOS,
  if it adds one, then ``ctx - len(BOS)`` text tokens). Inside a window every position after the first is
  scored, so each text token is predicted once (the first text token of a window without BOS is context only).
* Engines (:mod:`quantkit.engines`, one interface; nothing here picks an engine by format): a GGUF runs in llama.cpp
  (llama-cpp-python, ``logits_all=True``): its own kernels, never a dequantised copy. HF-format models (AWQ,
  GPTQ, compressed-tensors) are served by vLLM where this machine's vLLM can run the scheme
  (:func:`quantkit.engines.choose`), against the base served by the same vLLM (its top log-probabilities only:
  :func:`kld_vs_topk_sparse`), else they run in transformers against the base in transformers. The report says
  whether the engine's own tokenizer (llama.cpp's vocabulary, the folder's tokenizer) gives the same ids as the
  base tokenizer (``tokenizer_match``).
* The base distribution is computed once and cached under ``cache_home()/eval/`` keyed by base SHA + text
  sha256 + window settings, as the top-k log-probabilities per position, the log of the probability mass of all
  other tokens, and a few tokens sampled from that tail with their log-probabilities -- never the full
  vocabulary (llama.cpp's full-logit file is 37 GiB for Llama-3 on wikitext).
* Per variant: perplexity, PPL ratio and delta vs the base, mean KL divergence base -> variant with its 99th
  percentile and standard error, and the same-top-token rate: the figures ``llama-perplexity
  --kl-divergence`` prints.

The top-k cache and its error
-----------------------------
For each position the base distribution P is known exactly on its top-k tokens K, as one lumped mass
``R_P`` on the rest, and through ``m`` tokens drawn from the tail P(v)/R_P (v not in K); the variant Q is
computed in full at scoring time. The KLD is split exactly as::

    KL(P||Q) = sum_{v in K} P log(P/Q)  +  R_P log(R_P/R_Q)  +  R_P * KL(P_tail || Q_tail)

The first two terms are exact. The third is estimated from the tail samples with ``mean((r-1) - log r)``,
``r = (Q(v)/R_Q) / (P(v)/R_P)``: unbiased, never negative, and its variance vanishes as Q approaches P (so
base-vs-base is exactly 0). Dropping the third term (top-k + lumped rest only) is a lower bound that was 16-19%
low on SmolLM2-135M at k=64; with the 64 tail samples the mean KLD was within 1% of the exact full-vocabulary
figure for Q8_0, Q4_K_M and Q2_K, and the 99th percentile within 6%. The stated bounds (TOPK_REL_ERROR,
TOPK_P99_REL_ERROR) are checked by tests/test_evaluate.py.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantkit import engines, trust
from quantkit.engines.hf import hf_format
from quantkit.errors import QuantkitError
from quantkit.formats import EVAL_MAX_TOKENS
from quantkit.records import GATE_BY_KEY, GATES, EvalScore
from quantkit.util import (
    atomic_path,
    cache_home,
    default_threads,
    format_table,
    human_size,
    now_iso,
    progress,
    sha256_bytes,
)

DEFAULT_TOP_K = 64
#: Tail tokens sampled per position (with replacement, from the base distribution outside the top k).
TAIL_SAMPLES = 64
CACHE_VERSION = 3
WINDOWS = "non-overlapping"
#: Stated bounds of the cache's KLD error relative to the exact full-vocabulary KLD, for ~1k scored tokens
#: (README design: eval/bench; checked by tests/test_evaluate.py): mean KLD and its 99th percentile.
TOPK_REL_ERROR = 0.02
TOPK_P99_REL_ERROR = 0.10
#: The vLLM estimator (:func:`kld_vs_topk_sparse`: base top ``k`` vs the variant's top ``MAX_LOGPROBS``, the rest
#: grouped) is a lower bound: at most this far below the exact KLD. Measured on SmolLM2-135M vs its GPTQ 4-bit g64
#: (1020 tokens, from transformers' full logits): 0.2411 vs exact 0.2836 (0.850; p99 0.90).
#: tests/test_vllm.py checks the bound on LM-shaped distributions and on a 4-layer SmolLM2 served by vLLM.
SPARSE_KLD_REL_ERROR = 0.2


# ------------------------------------------------------------------------------------------ hardware
def hardware(threads: int | None = None) -> dict:
    """CPU model, logical cores, threads used, RAM and GPU name(s): enough to tell two reports apart."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cpu_count": os.cpu_count(), "threads": threads or default_threads(),
                            "platform": platform.platform(), "python": platform.python_version()}
    try:
        import psutil

        info["ram_bytes"] = psutil.virtual_memory().total
    except Exception:  # pragma: no cover - psutil is a dependency
        pass
    gpus = []
    try:
        import torch

        if torch.cuda.is_available():
            gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:
        pass
    info["gpu"] = ", ".join(gpus) if gpus else None
    return info


# ------------------------------------------------------------------------------------------ variants
@dataclass
class Variant:
    """One thing to score: a GGUF file (llama.cpp) or an HF folder (transformers)."""

    name: str
    kind: str  # "gguf" | "hf"
    path: Path
    format: str  # gguf | awq | gptq | compressed-tensors | hf
    spec: str  # what the user gave
    type: str | None = None
    manifest_dir: Path | None = None
    artifact: str | None = None
    size: int = 0
    bits_per_weight: float | None = None
    adapter: Path | None = None  # LoRA applied at run time: a GGUF LoRA (llama.cpp) or a PEFT folder (HF)
    engine: str | None = None  # a key of quantkit.engines.ENGINES (assign_engines / engines.choose)
    engine_note: str | None = None  # why an HF-format model is not scored in vLLM here

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "path": str(self.path), "format": self.format,
                "type": self.type, "artifact": self.artifact,
                "manifest": str(self.manifest_dir) if self.manifest_dir else None, "size": self.size,
                "adapter": str(self.adapter) if self.adapter else None}


def _with_adapter(vs: list[Variant], adapter: str, base) -> list[Variant]:
    """``VARIANT+ADAPTER``: the adapter applied at run time (a PEFT folder is converted once to a GGUF LoRA
    for GGUF variants). Results are not the variant's own, so they are not written into its quantkit.json; a
    GGUF adapter from ``quantkit lora`` gets them in its folder's quantkit.json (``measured_on``)."""
    from quantkit import lora

    ad = None if adapter.endswith(".gguf") and os.path.isfile(adapter) else lora.load_adapter(adapter)
    plain = getattr(base, "base", None) or base  # the unmerged base of BASE+ADAPTER
    for v in vs:
        if v.kind == "gguf":
            v.adapter = Path(adapter).resolve() if ad is None else lora.cached_gguf_adapter(ad, plain)
        elif ad is None:
            raise QuantkitError(f"{v.spec}+{adapter}: an HF-format variant takes a PEFT adapter folder, not a GGUF")
        else:
            v.adapter = ad.path
        v.name = f"{v.name}+{ad.name if ad else Path(adapter).stem}"
        v.manifest_dir = v.artifact = None
        if ad is None and (v.adapter.parent / "quantkit.json").is_file():
            from quantkit.manifest import Manifest

            arts = Manifest.load(v.adapter.parent, create=False).artifacts
            v.artifact = next((n for n, rec in arts.items() if rec.get("format") == "gguf-lora"
                               and any(f.get("path") == v.adapter.name for f in rec.get("files") or [])), None)
            v.manifest_dir = v.adapter.parent if v.artifact else None
    return vs


def _weights_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _from_manifest(folder: Path, spec: str) -> list[Variant]:
    from quantkit.manifest import Manifest

    m = Manifest.load(folder, create=False)
    out = []
    for name, rec in m.artifacts.items():
        p = (folder / rec.get("path", ".")).resolve()
        fmt = rec.get("format") or ("gguf" if p.suffix == ".gguf" else hf_format(p))
        if fmt == "gguf" or p.suffix == ".gguf":
            if not p.is_file():
                raise QuantkitError(f"{folder}/quantkit.json lists {name} at {p}, which is missing: re-run the "
                                    "command that made it (it redoes only what is missing)")
            label = name[:-5] if name.endswith(".gguf") else name
            out.append(Variant(label, "gguf", p, "gguf", spec, rec.get("type"), folder, name,
                               rec.get("size") or p.stat().st_size, rec.get("bits_per_weight")))
        elif p.is_dir() and (p / "config.json").is_file():
            out.append(Variant(name, "hf", trust.loadable(p, spec)[0], fmt, spec, rec.get("type"), folder, name,
                               _weights_size(p), rec.get("bits_per_weight")))
    if not out:
        raise QuantkitError(f"{folder}/quantkit.json lists no artifact to evaluate (no GGUF file or model folder)")
    return out


def resolve_variants(spec: str) -> list[Variant]:
    """A VARIANT argument -> the things to score (a folder of GGUFs gives one per artifact)."""
    from quantkit.ggufio import gguf_entry_points, gguf_set_size
    from quantkit.hub import HUB_ID_RE

    p = Path(os.path.expanduser(spec))
    if p.is_file():
        if p.suffix != ".gguf":
            raise QuantkitError(f"{spec} is a file but not a .gguf: give a GGUF file, a model folder or a Hub id")
        p = p.resolve()
        # A GGUF inside a quantkit folder: attach its artifact so results land in its quantkit.json.
        if (p.parent / "quantkit.json").is_file():
            try:
                for v in _from_manifest(p.parent, spec):
                    if v.path == p:
                        return [v]
            except QuantkitError:
                pass
        return [Variant(p.stem, "gguf", p, "gguf", spec, size=gguf_set_size(p))]
    if p.is_dir():
        p = p.resolve()
        if (p / "quantkit.json").is_file():
            return _from_manifest(p, spec)
        if (p / "config.json").is_file():
            if not any(p.glob("*.safetensors")):
                raise QuantkitError(f"{spec} has no *.safetensors weights: nothing to evaluate")
            return [Variant(p.name, "hf", trust.loadable(p, spec)[0], hf_format(p), spec, size=_weights_size(p))]
        ggufs = gguf_entry_points(sorted(p.glob("*.gguf")))  # a split set: its first shard
        if ggufs:
            return [Variant(g.stem, "gguf", g, "gguf", spec, size=gguf_set_size(g)) for g in ggufs]
        raise QuantkitError(f"{spec} holds no quantkit.json, config.json or .gguf file: nothing to evaluate")
    if spec.startswith(("./", "../", "/", "~")) or not HUB_ID_RE.match(spec):
        raise QuantkitError(f"{spec} does not exist (give a .gguf file, a model folder or a Hub id org/name)")
    return _hub_variants(spec)


def unique_names(resolved: list[Variant]) -> list[Variant]:
    """Unique display names (two folders may both hold "Q4_K_M")."""
    seen: dict[str, int] = {}
    for v in resolved:
        seen[v.name] = seen.get(v.name, 0) + 1
    for v in resolved:
        if seen[v.name] > 1:
            v.name = f"{v.name} [{v.manifest_dir.name if v.manifest_dir else v.path.parent.name}]"
    return resolved


def _hub_variants(repo_id: str) -> list[Variant]:
    from huggingface_hub import HfApi, snapshot_download

    from quantkit.ggufio import gguf_entry_points, gguf_set_size

    try:
        files = [s.rfilename for s in (HfApi().model_info(repo_id).siblings or [])]
    except Exception as e:
        from quantkit.hub import _hub_error

        raise _hub_error(e, repo_id, None) from None
    if any(f.endswith(".safetensors") for f in files):
        from quantkit.hub import resolve_model

        src = resolve_model(repo_id)
        return [Variant(src.name, "hf", src.path, hf_format(src.path), repo_id, size=_weights_size(src.path))]
    if any(f.endswith(".gguf") for f in files):
        try:
            path = Path(snapshot_download(repo_id, allow_patterns=["*.gguf", "quantkit.json"]))
        except Exception as e:
            from quantkit.hub import _hub_error

            raise _hub_error(e, repo_id, None) from None
        vs = _from_manifest(path, repo_id) if (path / "quantkit.json").is_file() else \
            [Variant(g.stem, "gguf", g, "gguf", repo_id, size=gguf_set_size(g))
             for g in gguf_entry_points(sorted(path.glob("*.gguf")))]
        for v in vs:  # never write into the Hub cache
            v.manifest_dir = v.artifact = None
        return vs
    raise QuantkitError(f"{repo_id} has neither safetensors nor GGUF files: nothing to evaluate")


# ------------------------------------------------------------------------------------------- text
def load_text(text: str | None) -> tuple[str, str]:
    """``(content, name)`` for ``"builtin"``/None, a file path, or (API only) the text itself."""
    from quantkit.texts import BUILTIN_EVAL_NAME, builtin_eval_text

    if text is None or text == "builtin":
        return builtin_eval_text(), BUILTIN_EVAL_NAME
    p = Path(os.path.expanduser(text))
    if "\n" not in text and len(text) < 4096:
        if p.is_file():
            try:
                return p.read_text(encoding="utf-8"), str(p)
            except UnicodeDecodeError:
                raise QuantkitError(f"--text {text} is not UTF-8 text") from None
        raise QuantkitError(f"--text {text}: no such file (give a UTF-8 text file, or `builtin`)")
    return text, "inline:" + sha256_bytes(text.encode())[:12]


def parse_fraction(value, option: str, *, percent_only_above_one: bool = True,
                   maximum: float | None = None) -> float | None:
    """``"3%"`` -> 0.03, ``"0.03"`` -> 0.03, None -> None. A bare number >= 1 is ambiguous and refused; a
    negative value, or one above ``maximum`` (a rate: 1), is refused whether written as a fraction or a %."""
    if value is None or value == "":
        return None
    s = str(value).strip()
    if isinstance(value, (int, float)):
        v = float(value)
    else:
        try:
            v = float(s[:-1]) / 100 if s.endswith("%") else float(s)
        except ValueError:
            raise QuantkitError(f"{option} {value!r} is not a number or a percentage like 3%") from None
    if percent_only_above_one and v >= 1 and not s.endswith("%"):
        raise QuantkitError(f"{option} {s} is ambiguous: write a percentage like {s}% or a fraction like 0.0{s}")
    if v < 0:
        raise QuantkitError(f"{option} {s} must not be negative")
    if maximum is not None and v > maximum:
        raise QuantkitError(f"{option} {s} is above {maximum:g} (100%): give a fraction like 0.9 or a percentage "
                            "like 90%")
    return v


# ------------------------------------------------------------------------------------------ windows
@dataclass
class TokenStream:
    ids: list[int]  # text token ids actually used (a whole number of windows)
    prefix: list[int]  # BOS (or nothing) put in front of every window
    ctx: int
    n_windows: int

    @property
    def per_window(self) -> int:
        return self.ctx - len(self.prefix)

    def window(self, i: int) -> list[int]:
        w = self.per_window
        return self.prefix + self.ids[i * w:(i + 1) * w]

    @property
    def scored_per_window(self) -> int:
        return self.ctx - 1

    @property
    def n_scored(self) -> int:
        return self.n_windows * self.scored_per_window

    def layout(self) -> str:
        bos = f"BOS(id {self.prefix[0]}) + {self.per_window} text tokens" if self.prefix else \
            f"{self.per_window} text tokens (no BOS)"
        return (f"{WINDOWS} windows of {self.ctx} tokens: {bos}; positions 1..{self.ctx - 1} of each window "
                f"scored ({self.n_scored} predictions)")


def _bos_prefix(tok) -> list[int]:
    probe = "Hello world"
    with_sp = tok(probe).input_ids
    without = tok(probe, add_special_tokens=False).input_ids
    n = len(with_sp) - len(without)
    if n > 0 and with_sp[n:n + len(without)] == without:
        return list(with_sp[:n])
    return []


def make_stream(tok, text: str, ctx: int, max_tokens: int) -> TokenStream:
    """Tokenise ``text`` once with the base tokenizer and cut it into whole windows."""
    if ctx < 16:
        raise QuantkitError(f"--ctx {ctx} is too small: use at least 16 (512 is usual)")
    ids = tok(text, add_special_tokens=False).input_ids
    prefix = _bos_prefix(tok)
    per = ctx - len(prefix)
    limit = min(len(ids), max_tokens)
    n_windows = limit // per
    if n_windows < 1:
        raise QuantkitError(f"the evaluation text has {len(ids)} tokens, fewer than one window of {per} "
                            f"(with --max-tokens {max_tokens}): give a longer --text or a smaller --ctx")
    return TokenStream(ids=list(ids[:n_windows * per]), prefix=prefix, ctx=ctx, n_windows=n_windows)


# ------------------------------------------------------------------------------------------ maths
def topk_cache_from_logits(logits, targets, k: int, samples: int = TAIL_SAMPLES, seed: int = 0) -> dict:
    """Base side. ``logits`` [n, V] -> the cached record of each position (see "The top-k cache" above):
    ``nll`` [n], ``idx``/``logp`` [n, k] (top-k tokens, log-probs), ``rest`` [n] (log of the mass outside the
    top k), ``sidx``/``slogp`` [n, samples] (tokens drawn from the tail with replacement, their log-probs)."""
    import torch

    # float64: logits can be large (hundreds), and float32 rounding of x - logZ would then be ~1e-5
    logp = torch.log_softmax(logits.double(), dim=-1)
    nll = -logp.gather(1, targets[:, None])[:, 0]
    k = min(k, logp.shape[1])
    vals, idx = logp.topk(k, dim=-1)
    masked = logp.scatter(1, idx, float("-inf"))
    rest = torch.logsumexp(masked, dim=-1)
    out = {"nll": nll, "idx": idx, "logp": vals, "rest": rest}
    if samples:
        tail = torch.nan_to_num((masked - rest[:, None]).exp(), nan=0.0)
        empty = tail.sum(-1) <= 0  # the top k hold all the mass: any token will do, its weight R_P is 0
        tail[empty, 0] = 1.0
        gen = torch.Generator().manual_seed(seed)
        sidx = torch.multinomial(tail, samples, replacement=True, generator=gen)
        out["sidx"] = sidx
        out["slogp"] = logp.gather(1, sidx)
    return {name: (t.float() if t.is_floating_point() else t) for name, t in out.items()}


def kld_vs_topk(logits_q, targets, idx, logp_p, rest_p, sidx=None, slogp_p=None):
    """Variant side. Returns (nll_q [n], kld [n], top1_match [n]) against the base's cached record.

    KLD = top-k part (exact) + R_P log(R_P/R_Q) (lumped tail, exact) + R_P * KL(P_tail || Q_tail), the last
    term estimated from the cached tail samples with the non-negative, low-variance estimator
    mean((r - 1) - log r), r = (Q(v)/R_Q) / (P(v)/R_P)."""
    import torch

    logits = logits_q.float()
    # log Z in float64 from a float32 pass (no full log-softmax copy: only gathered entries are needed); the
    # gathered entries are converted to float64 before subtracting, so large logits lose no precision.
    m = logits.max(dim=-1).values
    logz = m.double() + torch.exp(logits - m[:, None]).sum(-1).double().log()
    logp_p, rest_p = logp_p.double(), rest_p.double()
    slogp_p = slogp_p.double() if slogp_p is not None else None
    nll = (logz - logits.gather(1, targets[:, None])[:, 0].double()).float()
    idx = idx.long()
    if idx.numel() and int(idx.max()) >= logits.shape[1]:
        raise QuantkitError(f"the variant's vocabulary ({logits.shape[1]} tokens) is smaller than the base's: "
                            "they are not the same model family")
    q_k = logits.gather(1, idx).double() - logz[:, None]
    # Q's mass outside the base's top k: 1 - sum(top k), exact enough unless that mass is tiny; then recompute
    # those rows from the logits themselves.
    outside = 1.0 - q_k.exp().sum(-1)
    rest_q = torch.log(outside.clamp_min(1e-300))
    small = outside < 1e-4
    if bool(small.any()):
        rows = small.nonzero()[:, 0]
        sub = logits[rows].double().scatter(1, idx[rows], float("-inf"))
        rest_q[rows] = torch.logsumexp(sub, dim=-1) - logz[rows]
    kld = (logp_p.exp() * (logp_p - q_k)).sum(-1)
    r_p = rest_p.exp()
    finite = torch.isfinite(rest_p) & torch.isfinite(rest_q)
    kld = kld + torch.where(finite, r_p * (rest_p - rest_q), torch.zeros_like(r_p))
    if sidx is not None and sidx.shape[1]:
        sidx = sidx.long()
        lr = (logits.gather(1, sidx).double() - logz[:, None] - rest_q[:, None]) - (slogp_p - rest_p[:, None])
        est = ((lr.exp() - 1) - lr).mean(-1)
        kld = kld + torch.where(finite, r_p * torch.nan_to_num(est, nan=0.0, posinf=0.0), torch.zeros_like(r_p))
    kld = kld.clamp_min(0.0).float()
    top1 = logits.argmax(-1) == idx[:, 0]
    return nll, kld, top1


def kld_vs_topk_sparse(q_rows: list[dict], targets: list[int], idx, logp_p, k_q: int):
    """Variant side when the engine returns only its top log-probabilities (vLLM's ``prompt_logprobs``): ``q_rows``
    maps token id -> log Q for the variant's top ``k_q`` plus the target token. Returns (nll_q, kld, top1) as numpy.

    NLL and top-1 are exact. KLD is a **lower bound** (the log-sum inequality over a partition of the
    vocabulary): exact on the base's top-k tokens the variant also returned (A); the base's other top-k tokens
    (B) as one group, whose Q mass is at most ``|B|`` x the variant's k_q-th probability; everything else as one
    group; the unknown Q(B) is set to the value in its range that makes the sum smallest. A variant whose top
    tokens miss the base's (a broken model) scores high; :data:`SPARSE_KLD_REL_ERROR` says how far below the
    full KLD a healthy one lands."""
    import numpy as np

    n = len(q_rows)
    nll, kld, top1 = np.empty(n), np.empty(n), np.zeros(n, dtype=bool)
    idx, logp_p = np.asarray(idx), np.asarray(logp_p, dtype=np.float64)
    for i, (q, t) in enumerate(zip(q_rows, targets)):
        if t not in q:
            raise QuantkitError("the engine did not return the log-probability of a prompt token")
        nll[i] = -q[t]
        vals = sorted(q.values(), reverse=True)
        q_cap = math.exp(vals[k_q - 1]) if len(vals) >= k_q else 0.0  # no unknown token is more likely
        q_at = np.array([q.get(int(v), np.nan) for v in idx[i]])
        known = ~np.isnan(q_at)
        lp, lq = logp_p[i][known], q_at[known]
        pp = np.exp(lp)
        kl = float((pp * (lp - lq)).sum())
        q_a = min(float(np.exp(lq).sum()), 1.0)
        p_b = float(np.exp(logp_p[i][~known]).sum())
        p_r = max(1.0 - float(pp.sum()) - p_b, 0.0)
        q_b = p_b * (1.0 - q_a) / (p_b + p_r) if p_b + p_r > 0 else 0.0  # the minimiser, unless capped
        q_b = min(q_b, int((~known).sum()) * q_cap)
        q_r = max(1.0 - q_a - q_b, 1e-12)
        if p_b > 1e-12:
            kl += p_b * math.log(p_b / max(q_b, 1e-300))
        if p_r > 1e-12:
            kl += p_r * math.log(p_r / q_r)
        kld[i] = max(kl, 0.0)
        top1[i] = max(q, key=q.get) == int(idx[i][0])
    return nll, kld, top1


def topk_rows_to_cache(rows: list[dict], targets: list[int], k: int) -> dict:
    """Base side for an engine that returns top log-probabilities only (vLLM): the cache record of each position
    (``nll``, ``idx``/``logp`` top k, ``rest`` = log of the mass outside them; no tail samples)."""
    import numpy as np

    n = len(rows)
    idx, logp = np.zeros((n, k), dtype=np.int64), np.full((n, k), -np.inf)
    nll, rest = np.empty(n), np.empty(n)
    for i, (r, t) in enumerate(zip(rows, targets)):
        top = sorted(r.items(), key=lambda kv: -kv[1])[:k]
        if len(top) < k:
            raise QuantkitError(f"the engine returned {len(top)} log-probabilities per position, fewer than k={k}")
        idx[i] = [a for a, _ in top]
        logp[i] = [b for _, b in top]
        nll[i] = -r[t]
        rest[i] = math.log(max(1.0 - float(np.exp(logp[i]).sum()), 1e-30))
    return {"nll": nll, "idx": idx, "logp": logp, "rest": rest}


def exact_kld(logits_p, logits_q):
    """Full-vocabulary KL(P || Q) per row (for tests and the docs' error figure)."""
    import torch

    lp = torch.log_softmax(logits_p.double(), -1)
    lq = torch.log_softmax(logits_q.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


# ------------------------------------------------------------------------------------------ engines
def assign_engines(resolved: list[Variant], engine: str = "auto") -> str:
    """Set ``engine`` / ``engine_note`` on every variant (:func:`quantkit.engines.choose`: a GGUF in llama.cpp, an
    HF format in vLLM where this machine can run its scheme, else transformers) and return the engine of the
    run's base reference: ``vllm`` when every variant is served by vLLM, else ``transformers``."""
    for v in resolved:
        v.engine, v.engine_note = engines.choose(v.kind, v.path, engine, v.adapter)
    return "vllm" if all(v.engine == "vllm" for v in resolved) else "transformers"


# ------------------------------------------------------------------------------------------ base cache
def _cache_key(base_sha: str, text_sha: str, stream: TokenStream, max_tokens: int, k: int,
               engine: str = "transformers") -> str:
    key = {"v": CACHE_VERSION, "base": base_sha, "text": text_sha, "ctx": stream.ctx, "max_tokens": max_tokens,
           "prefix": stream.prefix, "windows": WINDOWS, "k": k, "samples": TAIL_SAMPLES,
           "ids": sha256_bytes(json.dumps(stream.ids).encode())}
    if engine != "transformers":  # the base served by vLLM: its own reference, per vLLM version
        key["engine"] = engines.get(engine).version()
    return sha256_bytes(json.dumps(key, sort_keys=True).encode())[:32]


def base_cache(base_path: Path, base_sha: str, text_sha: str, stream: TokenStream, max_tokens: int, k: int,
               threads: int | None, engine: str = "transformers", show_progress: bool = True
               ) -> tuple[dict, Path, bool]:
    """Base model's top-k distribution over the stream, from the disk cache or computed now: in transformers
    (full logits: top k + tail samples), or with ``engine="vllm"`` served by vLLM (its top k only), the
    reference of variants scored in vLLM."""
    import numpy as np
    import torch

    path = cache_home() / "eval" / f"{_cache_key(base_sha, text_sha, stream, max_tokens, k, engine)}.npz"
    if path.is_file():
        try:
            with np.load(path) as z:
                data = {name: z[name] for name in z.files}
            if data["nll"].shape[0] == stream.n_scored:
                data["meta"] = json.loads(str(data["meta"]))
                return data, path, True
        except Exception:
            pass  # unreadable cache: recompute
    session = engines.get(engine).open_reference(base_path, ctx=stream.ctx, threads=threads)
    chunks: dict[str, list] = {}
    t0 = time.perf_counter()
    windows = [stream.window(w) for w in range(stream.n_windows)]
    scored = session.score_windows(windows, progress=progress if show_progress else None, k=k)
    for w, (win, res) in enumerate(zip(windows, scored)):
        if session.sparse:
            rec = topk_rows_to_cache(res, win[1:], k)
        else:
            logits = res
            rec = {n: t.numpy() for n, t in topk_cache_from_logits(logits[:-1], torch.tensor(win[1:]), k,
                                                                    TAIL_SAMPLES, seed=w).items()}
        for name, t in rec.items():
            chunks.setdefault(name, []).append(t)
    if hasattr(scored, "close"):  # a generator: let it drop what it holds while the session is open
        scored.close()
    seconds = time.perf_counter() - t0
    vocab = _vocab_size(base_path) if session.sparse else int(logits.shape[1])
    idx_dtype = np.uint16 if vocab <= 65536 else np.int32
    data = {name: np.concatenate(parts).astype(idx_dtype if name in ("idx", "sidx") else np.float32)
            for name, parts in chunks.items()}
    meta = {"base_sha": base_sha, "text_sha256": text_sha, "ctx": stream.ctx, "max_tokens": max_tokens,
            "k": k, "tail_samples": 0 if session.sparse else TAIL_SAMPLES, "vocab": vocab,
            "windows": stream.n_windows, "engine": session.label,
            "seconds": round(seconds, 2), "tokens_per_second": round(stream.n_windows * stream.ctx / seconds, 1),
            "created": now_iso()}
    session.close()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta)), **data)
    data["meta"] = meta
    return data, path, False


def _vocab_size(folder: Path) -> int:
    try:
        cfg = json.loads((Path(folder) / "config.json").read_text())
        return int(cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size") or 1 << 31)
    except (OSError, ValueError, TypeError):
        return 1 << 31


# ------------------------------------------------------------------------------------------ report
def gate_failure_line(failed: list[dict], gates=None) -> str:
    """The one-line summary of failed gates; ``gates``: key -> :class:`quantkit.records.Gate` (default the
    eval gates)."""
    gates = gates or GATE_BY_KEY
    parts = []
    for f in failed:
        g = gates[f["gate"]]
        parts.append(f"{f['variant']} {g.label} {f['shown']} {g.op} {g.flag} {f['limit_shown']}")
    return f"{len(failed)} quality gate(s) failed: " + "; ".join(parts)


@dataclass
class EvalReport:
    base: dict
    context: dict
    rows: list[dict]
    gates: dict = field(default_factory=dict)
    failed: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"base": self.base, "context": self.context, "variants": self.rows, "gates": self.gates,
                "failed": self.failed, "passed": not self.failed, "notes": self.notes}

    def failure_line(self) -> str:
        return gate_failure_line(self.failed)

    def table(self) -> str:
        bad = {(f["variant"], f["gate"]) for f in self.failed}

        def mark(row, gate, text):
            return f"{text} !" if (row["name"], gate) in bad else text

        headers = ["variant", "engine", "size", "PPL", "dPPL", "KLD mean", "KLD p99", "top-1", "tok/s",
                   "tokenizer"]
        b = self.base
        rows = [[b["name"] + " (base)", b["engine_short"], human_size(b["size"]) if b.get("size") else "",
                 f"{b['ppl']:.4f}", "", "", "", "",
                 f"{b['tokens_per_second']:.0f}" if b.get("tokens_per_second") else "",
                 "base"]]
        for r in self.rows:
            rows.append([
                r["name"], r["engine_short"], human_size(r["size"]) if r.get("size") else "", f"{r['ppl']:.4f}",
                mark(r, "ppl_increase", f"{(r['ppl_ratio'] - 1) * 100:+.2f}%"),
                mark(r, "kld_mean", f"{r['kld_mean']:.5f}"), f"{r['kld_p99']:.4f}",
                mark(r, "top1", f"{r['top1'] * 100:.2f}%"), f"{r['tokens_per_second']:.0f}",
                "same" if r["tokenizer_match"] else ("DIFFERENT" if r["tokenizer_match"] is False else "n/a")])
        c = self.context
        lines = [f"text: {c['text']} (sha256 {c['text_sha256'][:16]}...), {c['tokens']} tokens, {c['layout']}",
                 "", format_table(rows, headers)]
        if self.gates:
            gl = ", ".join(f"{GATE_BY_KEY[g].flag} {v['shown']}" for g, v in self.gates.items())
            lines += ["", f"gates: {gl}: " + ("all passed" if not self.failed else
                                                f"{len(self.failed)} failed (cells marked !)")]
        for n in self.notes:
            lines.append(f"note: {n}")
        return "\n".join(lines)


def _pct(values, q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if len(values) else float("nan")


def _score_variant(v: Variant, stream: TokenStream, cache: dict, text: str, threads: int | None) -> dict:
    import numpy as np
    import torch

    eng = engines.get(v.engine or engines.choose(v.kind, v.path, "transformers")[0])
    t_load = time.perf_counter()
    # the engine's own tokenisation (llama.cpp's vocabulary, the folder's tokenizer) against the base's ids
    own, why = eng.tokens(v.path, text)
    n = len(stream.ids)
    tokenizer_match, mismatch_at = (None, None) if own is None and why is None else (False, why)
    if own is not None:
        tokenizer_match = own[:n] == stream.ids
        if not tokenizer_match:
            mismatch_at = next((i for i, (a, b) in enumerate(zip(own, stream.ids)) if a != b), min(len(own), n))
    scorer = eng.open(v.path, ctx=stream.ctx, threads=threads, adapter=v.adapter)
    load_s = time.perf_counter() - t_load
    n_per = stream.scored_per_window
    nll_all, kld_all, top1_all = [], [], []
    nonfinite = 0
    t0 = time.perf_counter()
    for w in progress(range(stream.n_windows), desc=f"{v.name} ({v.kind})", unit="win"):
        win = stream.window(w)
        sl = slice(w * n_per, (w + 1) * n_per)
        if scorer.sparse:
            nll, kld, top1 = kld_vs_topk_sparse(scorer.score(win, scorer.max_k), win[1:], cache["idx"][sl],
                                                cache["logp"][sl], scorer.max_k)
            nonfinite += int((~np.isfinite(nll)).sum())
            nll_all.append(nll)
            kld_all.append(kld)
            top1_all.append(top1)
            continue
        try:
            logits = scorer.score(win)[:-1]
        except QuantkitError:
            raise
        except Exception as e:  # the engine cannot run this model here: say so in one line
            scorer.close()
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise QuantkitError(f"{v.name}: {eng.short} failed to run it on this machine "
                                f"({type(e).__name__}: {msg[:200]})") from None
        nonfinite += int((~torch.isfinite(logits)).sum())
        sidx = torch.from_numpy(cache["sidx"][sl].astype(np.int64)) if "sidx" in cache else None
        slogp = torch.from_numpy(cache["slogp"][sl]) if "slogp" in cache else None
        nll, kld, top1 = kld_vs_topk(logits, torch.tensor(win[1:]), torch.from_numpy(cache["idx"][sl].astype(np.int64)),
                                     torch.from_numpy(cache["logp"][sl]), torch.from_numpy(cache["rest"][sl]),
                                     sidx, slogp)
        nll_all.append(nll.numpy())
        kld_all.append(kld.numpy())
        top1_all.append(top1.numpy())
    seconds = time.perf_counter() - t0
    engine, sparse, max_k = scorer.label, scorer.sparse, scorer.max_k
    load_s = scorer.load_seconds or load_s
    scorer.close()
    nll = np.concatenate(nll_all).astype(np.float64)
    kld = np.concatenate(kld_all).astype(np.float64)
    top1 = np.concatenate(top1_all)
    base_nll = cache["nll"].astype(np.float64)
    ppl = float(math.exp(nll.mean()))
    base_ppl = float(math.exp(base_nll.mean()))
    d = nll - base_nll
    n = len(nll)
    ratio = ppl / base_ppl
    row = {
        "name": v.name, "spec": v.spec, "path": str(v.path), "format": v.format, "type": v.type, "kind": v.kind,
        "artifact": v.artifact, "size": v.size, "adapter": str(v.adapter) if v.adapter else None,
        "ppl": ppl, "base_ppl": base_ppl, "ppl_ratio": ratio, "delta_ppl": ppl - base_ppl,
        "ppl_ratio_se": float(ratio * d.std(ddof=1) / math.sqrt(n)) if n > 1 else None,
        "kld_mean": float(kld.mean()), "kld_se": float(kld.std(ddof=1) / math.sqrt(n)) if n > 1 else None,
        "kld_p99": _pct(kld, 99), "kld_median": _pct(kld, 50), "kld_max": float(kld.max()),
        "top1": float(top1.mean()), "nonfinite_logits": nonfinite, "tokens": n, "windows": stream.n_windows,
        "ctx": stream.ctx,
        "engine": engine, "engine_short": eng.short,
        "tokenizer_match": tokenizer_match, "tokenizer_first_mismatch": mismatch_at,
        "kld_estimator": (f"top-k lower bound: base top {cache['idx'].shape[1]} vs its top "
                          f"{max_k}, the rest grouped" if sparse else
                          f"top {cache['idx'].shape[1]} + lumped rest + {cache['sidx'].shape[1]} tail samples"
                          if "sidx" in cache else f"top {cache['idx'].shape[1]} + lumped rest"),
        "engine_note": v.engine_note,
        "load_seconds": round(load_s, 2), "seconds": round(seconds, 2),
        "tokens_per_second": stream.n_windows * stream.ctx / seconds,
    }
    return row


def base_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, **trust.hf_kwargs())
    except Exception as e:
        raise QuantkitError(f"cannot load the base tokenizer from {path} ({type(e).__name__}); the base must "
                            "be an HF folder with its tokenizer files") from None


def evaluate(base: str, variants: list[str], *, text: str | None = "builtin", ctx: int = 512,
             max_tokens: int = EVAL_MAX_TOKENS, max_kld: float | None = None, max_ppl_increase=None, min_top1=None,
             write_manifest: bool = True, top_k: int = DEFAULT_TOP_K, threads: int | None = None,
             engine: str = "auto") -> EvalReport:
    """Score every variant against ``base`` on one token stream; see the module docstring. ``engine`` picks the
    engine of HF-format variants (:func:`quantkit.engines.choose`): those scored in vLLM are compared with the base
    served by the same vLLM, the others with the base in transformers."""
    from quantkit.lora import resolve_source, split_spec
    from quantkit.texts import text_sha256

    if not variants:
        raise QuantkitError("give at least one VARIANT to evaluate against the base")
    if top_k < 1:
        raise QuantkitError(f"--top-k {top_k} must be at least 1")
    limits = {"max_kld": None if max_kld is None else float(max_kld),
              "max_ppl_increase": parse_fraction(max_ppl_increase, "--max-ppl-increase",
                                                 percent_only_above_one=True),
              "min_top1": parse_fraction(min_top1, "--min-top1", maximum=1)}
    gates = {g.key: {"limit": limits[g.name], "shown": g.show_limit(limits[g.name])}
             for g in GATES if limits[g.name] is not None}

    per_spec = [(resolve_variants(vspec), adapter) for vspec, adapter in map(split_spec, variants)]
    src = resolve_source(base)  # BASE+ADAPTER: the merged fine-tune (full precision) is the reference
    resolved = unique_names([v for vs, adapter in per_spec
                             for v in (_with_adapter(vs, adapter, src) if adapter else vs)])
    ref = assign_engines(resolved, engine)

    content, text_name = load_text(text)
    tsha = text_sha256(content)
    tok = base_tokenizer(src.path)
    stream = make_stream(tok, content, ctx, max_tokens)
    caches: dict[str, tuple] = {}

    def cache_for(eng: str) -> dict:
        if eng not in caches:
            caches[eng] = base_cache(src.path, src.sha, tsha, stream, max_tokens, top_k, threads, engine=eng)
        return caches[eng][0]

    cache = cache_for(ref)
    _, cache_path, cached = caches[ref]
    meta = cache["meta"]
    base_ppl = float(math.exp(cache["nll"].astype("float64").mean()))
    context = {
        "text": text_name, "text_sha256": tsha, "ctx": ctx, "max_tokens": max_tokens, "tokens": stream.n_scored,
        "text_tokens": len(stream.ids), "windows": stream.n_windows, "window_mode": WINDOWS,
        "layout": stream.layout(), "bos": stream.prefix, "top_k": top_k, "tail_samples": TAIL_SAMPLES,
        "kld_cache_rel_error": {"mean": TOPK_REL_ERROR, "p99": TOPK_P99_REL_ERROR},
        "base_cache": {"path": str(cache_path), "bytes": cache_path.stat().st_size, "reused": cached},
        "hardware": hardware(threads), "time": now_iso(),
    }
    base_row = {"name": src.name, "id": src.id, "sha": src.sha, "path": str(src.path), "ppl": base_ppl,
                "engine": meta["engine"], "engine_short": meta["engine"].split(" (")[0].split(" ")[0],
                "size": _weights_size(src.path),
                "tokens_per_second": None if cached else meta.get("tokens_per_second")}
    rows = [_score_variant(v, stream, cache_for(engines.get(v.engine).reference), content, threads)
            for v in resolved]

    failed = []
    for r in rows:
        score = EvalScore.from_row(r, context)
        r["gates"] = {}
        for key, spec in gates.items():
            g = GATE_BY_KEY[key]
            value = g.value(score)
            r["gates"][key] = ok = g.passes(value, spec["limit"])
            if not ok:
                failed.append({"variant": r["name"], "gate": key, "value": value, "limit": spec["limit"],
                               "shown": g.shown(value), "limit_shown": spec["shown"]})
    notes = []
    if "vllm" in caches and ref != "vllm":
        vb = caches["vllm"][0]
        notes.append(f"{', '.join(r['name'] for r in rows if r['engine'].startswith('vLLM'))}: scored in "
                     f"{vb['meta']['engine']} against the base served by the same vLLM (base PPL "
                     f"{math.exp(vb['nll'].astype('float64').mean()):.4f})")
    for r in rows:
        if r.get("engine_note"):
            notes.append(f"{r['name']}: {r['engine_note']}; scored in transformers")
    for r in rows:
        if r["tokenizer_match"] is False:
            where = r["tokenizer_first_mismatch"]
            why = where if isinstance(where, str) else f"first difference at token {where}"
            who = "llama.cpp's tokenizer" if r["kind"] == "gguf" else "its own tokenizer"
            notes.append(f"{r['name']}: {who} does not give the base tokenizer's ids ({why}); "
                         "it was scored on the base's ids")
    report = EvalReport(base=base_row, context=context, rows=rows, gates=gates, failed=failed, notes=notes)
    if write_manifest:
        _write_manifests(report, resolved, src)
    return report


def _write_manifests(report: EvalReport, resolved: list[Variant], src) -> None:
    from quantkit.manifest import Manifest

    c = report.context
    by_dir: dict[Path, list[tuple[Variant, dict]]] = {}
    for v, r in zip(resolved, report.rows):
        if v.manifest_dir and v.artifact:
            by_dir.setdefault(v.manifest_dir, []).append((v, r))
    for folder, items in by_dir.items():
        m = Manifest.load(folder, create=False)  # fresh read: another stage may have written meanwhile
        for v, r in items:
            if v.artifact not in m.artifacts:
                continue
            if m.artifacts[v.artifact].get("format") == "gguf-lora":  # an adapter: the bases it was measured on
                on = {"variant": r["name"].rsplit("+", 1)[0], "format": v.format, "type": v.type, "size": v.size,
                      "eval": EvalScore.from_row(r, c).to_json()}
                m.artifacts[v.artifact].setdefault("measured_on", {})[on["variant"]] = on
                continue
            m.update_artifact(v.artifact, eval=EvalScore.from_row(r, c).to_json())
        m.data["evaluation"] = {
            "text": c["text"], "text_sha256": c["text_sha256"], "ctx": c["ctx"], "max_tokens": c["max_tokens"],
            "tokens": c["tokens"], "windows": c["windows"], "window_mode": c["window_mode"], "layout": c["layout"],
            "top_k": c["top_k"], "base": {"id": src.id, "sha": src.sha, "path": str(src.path)},
            "base_ppl": report.base["ppl"], "base_engine": report.base["engine"], "hardware": c["hardware"],
            "time": c["time"]}
        m.log("eval", variants=[v.artifact for v, _ in items], passed=not report.failed)
        m.save()
