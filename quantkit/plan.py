"""``quantkit plan``: how big each variant of a model is, what it needs to run and to be made.

Inputs: the model's ``config.json`` and, when available, its safetensors headers (a local folder: the first
bytes of each ``*.safetensors`` file; a Hub id: ``huggingface_hub.get_safetensors_metadata``, which reads only
the headers, never the weights). Without headers the parameter count is computed from the config.

Sizes (bytes; printed in GB = 10^9 bytes):

* weights: FP16/BF16 = 2 bytes per parameter. INT8 / INT4 (AWQ, GPTQ) quantise the Linear layers of the
  transformer blocks; per group of ``group_size`` weights they also store one fp16 scale and one packed zero
  point of ``bits`` bits, so ``bits + (16 + bits) / group_size`` bits per weight (INT4 g128: 4.156); embeddings,
  ``lm_head`` and norms stay 16-bit. GGUF: bits per weight from llama.cpp -- block types from ggml's type
  table (Q8_0 = 34 bytes / 32 weights = 8.5; Q6_K 210/256 = 6.5625; IQ4_XS 136/256 = 4.25 ...), and the k-quant
  mixes (Q4_K_M ...) from the sizes ``tools/quantize/quantize.cpp`` lists for Llama-3-8B (8.03B parameters,
  GiB): Q4_K_M 4.58 GiB = 4.90 bits/weight, Q5_K_M 5.33 GiB = 5.70, Q3_K_M 3.74 GiB = 4.00, Q2_K 2.96 GiB = 3.17.
* KV cache (fp16, GQA-aware): ``2 (K and V) * layers * kv_heads * head_dim * context * batch * 2 bytes``.
* total = weights + KV cache + runtime overhead (0.5 GiB + 5% of the weights: CUDA/Metal context,
  activations, llama.cpp compute buffers).
* devices: a variant fits when its total is at most the device's memory; Apple M-series GPUs can use about 75%
  of unified memory by default (Metal's recommended working set), so 64/128/192 GB hold 48/96/144 GB. AWQ/GPTQ
  rows are listed for NVIDIA GPUs only (vLLM/TGI kernels); FP16 and GGUF for all.
* the quantisation run: disk = the downloaded checkpoint (unless it is a local folder) + intermediates + outputs;
  RAM: GGUF conversion streams tensors (llama.cpp's lazy converter, mmap'ed quantiser), so about the largest
  tensor plus 2 GiB, and with an importance matrix the whole F16 model; AWQ/GPTQ load the whole model in 16-bit
  into RAM (then work layer by layer), so 2 bytes per parameter plus 2 GiB.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from quantkit.errors import QuantkitError
from quantkit.formats import GGUF_TYPES
from quantkit.util import safetensors_tensors

GiB = 1 << 30
GB = 10**9

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}

GGUF_COMMON = ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "IQ4_XS", "Q3_K_M", "Q2_K"]

KV_BYTES = 2  # fp16 KV cache
OVERHEAD_FIXED = GiB // 2
OVERHEAD_FRACTION = 0.05
APPLE_GPU_FRACTION = 0.75


@dataclass(frozen=True)
class Device:
    name: str
    memory: int  # bytes the model may use
    kind: str  # "nvidia" | "apple"


DEVICES = [
    Device("RTX 4090 24GB", 24 * GiB, "nvidia"),
    Device("A100 40GB", 40 * GiB, "nvidia"),
    Device("A6000 48GB", 48 * GiB, "nvidia"),
    Device("A100 80GB", 80 * GiB, "nvidia"),
    Device("H100 80GB", 80 * GiB, "nvidia"),
    Device("H200 141GB", 141 * GB, "nvidia"),
    Device("Apple M 64GB", int(64 * GiB * APPLE_GPU_FRACTION), "apple"),
    Device("Apple M 128GB", int(128 * GiB * APPLE_GPU_FRACTION), "apple"),
    Device("Apple M 192GB", int(192 * GiB * APPLE_GPU_FRACTION), "apple"),
]


@dataclass
class Row:
    name: str  # "FP16" | "INT8 (AWQ/GPTQ g128)" | "GGUF Q4_K_M" ...
    method: str  # "fp16" | "awq" | "gptq" | "gguf"
    bits_per_weight: float  # averaged over all parameters
    weight_bytes: int
    kv_bytes: int
    overhead_bytes: int
    total_bytes: int
    fits: list[str]
    source: str = ""
    shards: int = 1  # GGUF: files after splitting for the Hub (llama-gguf-split at the default size)
    bits: int | None = None  # AWQ/GPTQ weight bits
    checked_by: str = ""  # the engine that checks such a variant on this machine (plan(); see checked_here)
    not_in_vllm: str | None = None  # HF formats checked in transformers here: why not in vLLM
    active_weight_bytes: int | None = None  # MoE: the weights one token reads (its top-k experts), this format


@dataclass
class Need:
    disk_bytes: int
    ram_bytes: int
    note: str


@dataclass
class Plan:
    model: str
    params_source: str  # "safetensors headers" | "config.json"
    architecture: str | None
    params_total: int
    params_active: int
    params_linear: int  # quantised by AWQ/GPTQ
    layers: int
    hidden_size: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    experts: int | None
    experts_per_token: int | None
    checkpoint_bytes: int  # the checkpoint on disk (download size)
    checkpoint_local: bool
    largest_tensor_bytes: int
    context: int
    batch: int
    kv_bytes: int
    rows: list[Row] = field(default_factory=list)
    needs: dict[str, Need] = field(default_factory=dict)
    linear_widths: dict[int, str] = field(default_factory=dict)  # input width -> a matrix AWQ/GPTQ quantise
    #: the base's reference distribution (verify and eval compare with it; see :mod:`quantkit.engines.hf_stream`)
    reference: Need | None = None

    # -- output ---------------------------------------------------------------------------------
    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("linear_widths")
        d["devices"] = [asdict(x) for x in DEVICES]
        return d

    def row(self, name: str) -> Row:
        for r in self.rows:
            if r.name == name or r.name.endswith(" " + name):
                return r
        raise KeyError(name)

    def table(self) -> str:
        from quantkit.util import format_table

        p = self
        moe = (f", MoE {p.experts} experts / {p.experts_per_token} active: {p.params_active / 1e9:.2f}B active"
               if p.experts else "")
        head = (f"{p.model}: {p.params_total / 1e9:.2f}B parameters ({p.params_source}){moe}\n"
                f"{p.layers} layers, hidden {p.hidden_size}, {p.heads} heads / {p.kv_heads} KV heads x {p.head_dim}, "
                f"vocab {p.vocab_size}; KV cache fp16 for context {p.context} x batch {p.batch}: "
                f"{p.kv_bytes / GB:.2f} GB")
        active = [[_gb(r.active_weight_bytes)] if p.experts else [] for r in p.rows]
        rows = [(r.name, f"{r.bits_per_weight:.2f}", _gb(r.weight_bytes), *a, _gb(r.kv_bytes), _gb(r.total_bytes),
                 ", ".join(_short(r.fits)) or "none of the listed", r.checked_by) for r, a in zip(p.rows, active)]
        t = format_table(rows, ["variant", "bits/w", "weights GB", *(["active GB/token"] if p.experts else []),
                                "KV GB", "total GB", "fits on", "checked here by"])
        why = sorted({r.not_in_vllm for r in p.rows if r.not_in_vllm})
        ref = [("base reference", "-", _gb(p.reference.ram_bytes), p.reference.note)] if p.reference else []
        needs = format_table([(m, _gb(n.disk_bytes), _gb(n.ram_bytes), n.note) for m, n in p.needs.items()] + ref,
                             ["quantise with", "disk GB", "RAM GB", "notes"])
        foot = ("total = weights + KV cache + runtime overhead (0.5 GiB + 5%). Apple: 75% of unified memory. "
                "GGUF bits/weight: llama.cpp quantize.cpp (Llama-3-8B sizes) and ggml block sizes.")
        if p.experts:
            foot += ("\nMoE: every expert must be resident (total, fits on); a token reads only its "
                     f"{p.experts_per_token} routed experts plus the shared weights (active GB/token), which sets "
                     "decode speed.")
        split = [f"{r.name.removeprefix('GGUF ')} ({r.shards} files)" for r in p.rows if r.shards > 1]
        if split:
            from quantkit.ggufio import DEFAULT_SPLIT_MAX_SIZE

            foot += (f"\nSplit for the Hub's 50 GB file limit (GGUFs over {DEFAULT_SPLIT_MAX_SIZE}, llama-gguf-split): "
                     + ", ".join(split) + ".")
        foot += "".join(f"\nNot checked in vLLM on this machine: {w}." for w in why)
        return f"{head}\n\n{t}\n\nQuantisation run needs:\n{needs}\n\n{foot}"

    # -- checks ---------------------------------------------------------------------------------
    def check_group_size(self, group_size: int) -> None:
        """Raise QuantkitError when an AWQ/GPTQ ``group_size`` does not divide every quantised matrix's input
        width (known from the headers or config alone, so this runs before any download)."""
        from quantkit.formats import check_group_size

        check_group_size({"in_features": self.linear_widths}, group_size, self.model)

    def check_machine(self, method: str, *, out: str | os.PathLike | None = None,
                      imatrix: bool = False, group_sizes=()) -> None:
        """Raise QuantkitError when this machine clearly cannot quantise with ``method``, or when one of
        ``group_sizes`` (AWQ/GPTQ) does not fit the model's matrices.

        Checks the free disk where ``out`` will be written and the machine's total RAM against :attr:`needs`.
        """
        import psutil

        for gs in group_sizes:
            self.check_group_size(gs)

        key = "gguf+imatrix" if method == "gguf" and imatrix else method
        need = self.needs.get(key) or self.needs.get(method)
        if need is None:
            raise QuantkitError(f"unknown method {method!r}: plan knows {', '.join(self.needs)}")
        where = Path(out or ".").resolve()
        probe = where
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        if need.disk_bytes > free:
            raise QuantkitError(
                f"{method} of {self.model} needs about {_gb(need.disk_bytes)} GB of disk at {where}, only "
                f"{_gb(free)} GB are free: free some space or set `out:` to a bigger disk "
                f"(see `quantkit plan {self.model}`)")
        ram = psutil.virtual_memory().total + psutil.swap_memory().total
        if need.ram_bytes > ram:
            raise QuantkitError(
                f"{method} of {self.model} needs about {_gb(need.ram_bytes)} GB of RAM, this machine has "
                f"{_gb(ram)} GB (RAM + swap): use a bigger machine (see `quantkit plan {self.model}`)")


def _gb(n: int | float) -> str:
    return f"{n / GB:.2f}" if n < 10 * GB else f"{n / GB:.1f}"


def _short(names: list[str]) -> list[str]:
    return [n.replace(" GB", "GB") for n in names]


# -- reading the model -----------------------------------------------------------------------------

def _text_config(config: dict) -> dict:
    """Multimodal configs keep the language model under ``text_config``."""
    tc = config.get("text_config")
    if isinstance(tc, dict) and tc.get("hidden_size"):
        return {**config, **tc}
    return config


def _arch(config: dict) -> dict:
    c = _text_config(config)
    try:
        hidden = int(c["hidden_size"])
        layers = int(c["num_hidden_layers"])
        heads = int(c["num_attention_heads"])
        vocab = int(c["vocab_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise QuantkitError(f"config.json lacks {e} (hidden_size, num_hidden_layers, num_attention_heads, "
                            "vocab_size are needed to size a decoder model)") from None
    kv = int(c.get("num_key_value_heads") or heads)
    head_dim = int(c.get("head_dim") or hidden // heads)
    experts = c.get("num_local_experts") or c.get("num_experts") or c.get("n_routed_experts")
    top_k = c.get("num_experts_per_tok") or c.get("moe_topk") or (2 if experts else None)
    inter = int(c.get("intermediate_size") or 4 * hidden)
    moe_inter = int(c.get("moe_intermediate_size") or inter)
    return dict(hidden=hidden, layers=layers, heads=heads, kv=kv, head_dim=head_dim, vocab=vocab,
                inter=inter, moe_inter=moe_inter, experts=int(experts) if experts else None,
                top_k=int(top_k) if top_k else None,
                shared_inter=int(c.get("shared_expert_intermediate_size") or 0),
                tied=bool(c.get("tie_word_embeddings", False)),
                qkv_bias=bool(c.get("attention_bias", False)) or c.get("model_type") in ("qwen2", "qwen2_moe"),
                model_type=c.get("model_type"))


def params_from_config(config: dict) -> dict:
    """Parameter counts of a Llama-family decoder (Llama, Mistral, Qwen2, Mixtral, Qwen-MoE) from its config.

    Returns ``{"total", "active", "linear", "embed", "largest"}``. Exact for those families (checked against
    their published counts in the tests); an estimate for other architectures.
    """
    a = _arch(config)
    h, hd = a["hidden"], a["head_dim"]
    q = h * a["heads"] * hd
    kv = 2 * h * a["kv"] * hd
    o = a["heads"] * hd * h
    attn = q + kv + o
    bias = (a["heads"] * hd + 2 * a["kv"] * hd) if a["qkv_bias"] else 0
    norms = 2 * h
    if a["experts"]:
        expert = 3 * h * a["moe_inter"]
        router = h * a["experts"]
        shared = 3 * h * a["shared_inter"] + (h if a["shared_inter"] else 0)  # shared expert + its gate
        mlp_total = a["experts"] * expert + router + shared
        mlp_active = a["top_k"] * expert + router + shared
        mlp_linear = a["experts"] * expert + (3 * h * a["shared_inter"])
    else:
        mlp_total = mlp_active = mlp_linear = 3 * h * a["inter"]
    embed = a["vocab"] * h
    head = 0 if a["tied"] else embed
    layer_total = attn + bias + norms + mlp_total
    layer_active = attn + bias + norms + mlp_active
    total = a["layers"] * layer_total + embed + head + h
    active = a["layers"] * layer_active + embed + head + h
    linear = a["layers"] * (attn + mlp_linear)
    return {"total": total, "active": active, "linear": linear, "embed": embed + head,
            "largest": max(embed, h * a["inter"], h * a["moe_inter"]), "block": max(embed, layer_total)}


def _is_expert(name: str) -> bool:
    return ".experts." in name and "shared" not in name


def _is_linear(name: str, shape: list[int]) -> bool:
    if len(shape) != 2 or not name.endswith(".weight"):
        return False
    if "embed" in name or "lm_head" in name or "norm" in name:
        return False
    if name.endswith((".gate.weight", ".router.weight", "shared_expert_gate.weight")):
        return False  # MoE routers stay unquantised
    return ".layers." in name or ".h." in name or ".blocks." in name


def params_from_tensors(tensors: dict[str, tuple[str, list[int]]], config: dict) -> dict:
    """Counts from ``{name: (dtype, shape)}`` (safetensors headers)."""
    from quantkit.engines.hf_stream import block_of

    total = linear = expert = embed = largest = nbytes = 0
    widths: dict[int, str] = {}
    blocks: dict[str, int] = {}
    for name, (dtype, shape) in tensors.items():
        n = 1
        for s in shape:
            n *= int(s)
        total += n
        nbytes += n * DTYPE_BYTES.get(dtype, 2)
        largest = max(largest, n)
        blocks[block_of(name)] = blocks.get(block_of(name), 0) + n
        if _is_expert(name):
            expert += n
        if _is_linear(name, shape):
            linear += n
            widths.setdefault(int(shape[1]), name)
        if "embed" in name or "lm_head" in name:
            embed += n
    a = _arch(config)
    active = total
    if a["experts"] and expert:
        active = total - expert + expert * a["top_k"] // a["experts"]
    return {"total": total, "active": active, "linear": linear, "embed": embed, "largest": largest,
            "bytes": nbytes, "widths": widths, "block": max(blocks.values(), default=0)}


def _local_inputs(folder: Path) -> tuple[dict, dict | None, int]:
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise QuantkitError(f"{folder} has no config.json: give a Hugging Face model folder or a Hub id")
    config = json.loads(cfg.read_text())
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return config, None, 0
    size = sum(f.stat().st_size for f in files)
    tensors = {name: (dtype, shape) for name, dtype, shape, _ in safetensors_tensors(folder)}
    return config, tensors, size


def _hub_inputs(repo_id: str, revision: str | None) -> tuple[dict, dict | None, int]:
    from huggingface_hub import get_safetensors_metadata, hf_hub_download

    from quantkit.hub import _hub_error

    try:
        config = json.loads(Path(hf_hub_download(repo_id, "config.json", revision=revision)).read_text())
    except Exception as e:
        raise _hub_error(e, repo_id, revision) from None
    try:
        meta = get_safetensors_metadata(repo_id, revision=revision)
    except Exception:  # no safetensors (or not readable): fall back to the config
        return config, None, 0
    tensors, size = {}, 0
    for fm in meta.files_metadata.values():
        for name, ti in fm.tensors.items():
            tensors[name] = (ti.dtype, list(ti.shape))
            size += ti.data_offsets[1] - ti.data_offsets[0]
    return config, tensors, size


def load_inputs(model: str, revision: str | None = None) -> tuple[str, dict, dict | None, int, bool]:
    """(display name, config, tensors or None, checkpoint bytes, is_local) for MODEL."""
    from quantkit.hub import is_local

    if model.startswith("builtin:"):
        from quantkit.demo import resolve_builtin

        folder = resolve_builtin(model)
        cfg, tensors, size = _local_inputs(folder)
        return model, cfg, tensors, size, True
    if is_local(model):
        folder = Path(os.path.expanduser(model))
        if not folder.is_dir():
            raise QuantkitError(f"{model} is neither a local model folder nor a Hub id (org/name)")
        if folder.is_file() or not (folder / "config.json").exists():
            raise QuantkitError(f"{folder} has no config.json: give a Hugging Face model folder or a Hub id")
        cfg, tensors, size = _local_inputs(folder)
        return str(folder), cfg, tensors, size, True
    cfg, tensors, size = _hub_inputs(model, revision)
    return model, cfg, tensors, size, False


# -- the plan ----------------------------------------------------------------------------------------

def plan_from_config(config: dict, *, model: str = "model", tensors: dict | None = None,
                     checkpoint_bytes: int = 0, local: bool = False, context: int = 8192,
                     batch: int = 1, group_size: int = 128) -> Plan:
    """The :class:`Plan` for a config (and optionally its safetensors tensor table)."""
    if context < 1 or batch < 1:
        raise QuantkitError(f"--context and --batch must be positive (got {context} and {batch})")
    a = _arch(config)
    if tensors:
        counts = params_from_tensors(tensors, config)
        source = "safetensors headers"
        checkpoint_bytes = checkpoint_bytes or counts["bytes"]
    else:
        counts = params_from_config(config)
        source = "config.json"
        dtype = str(_text_config(config).get("torch_dtype") or _text_config(config).get("dtype") or "bfloat16")
        checkpoint_bytes = checkpoint_bytes or counts["total"] * (4 if "32" in dtype else 2)
    total, linear = counts["total"], counts["linear"]
    kv = 2 * a["layers"] * a["kv"] * a["head_dim"] * context * batch * KV_BYTES
    p = Plan(model=model, params_source=source, architecture=(config.get("architectures") or [None])[0],
             params_total=total, params_active=counts["active"], params_linear=linear, layers=a["layers"],
             hidden_size=a["hidden"], heads=a["heads"], kv_heads=a["kv"], head_dim=a["head_dim"],
             vocab_size=a["vocab"], experts=a["experts"], experts_per_token=a["top_k"] if a["experts"] else None,
             checkpoint_bytes=int(checkpoint_bytes), checkpoint_local=local,
             largest_tensor_bytes=int(counts["largest"]) * 4, context=context, batch=batch, kv_bytes=kv,
             linear_widths=counts.get("widths") or {w: "a layer (config.json)" for w in
                                                     (a["hidden"], a["heads"] * a["head_dim"], a["inter"])})

    active = counts["active"]
    inactive = total - active  # routed experts a token does not use: all in quantised Linear layers

    def add(name, method, weight_bytes, source, kinds=("nvidia", "apple"), active_bytes=None):
        weight_bytes = int(weight_bytes)
        overhead = int(OVERHEAD_FIXED + OVERHEAD_FRACTION * weight_bytes)
        tot = weight_bytes + kv + overhead
        fits = [d.name for d in DEVICES if d.kind in kinds and tot <= d.memory]
        p.rows.append(Row(name=name, method=method, bits_per_weight=round(weight_bytes * 8 / total, 3),
                          weight_bytes=weight_bytes, kv_bytes=kv, overhead_bytes=overhead, total_bytes=tot,
                          fits=fits, source=source,
                          active_weight_bytes=int(active_bytes) if a["experts"] and active_bytes is not None
                          else None))

    add("FP16/BF16", "fp16", total * 2, "2 bytes/parameter", active_bytes=active * 2)
    rest = total - linear
    for bits in (8, 4):
        bpw = bits + (16 + bits) / group_size
        add(f"INT{bits} AWQ/GPTQ g{group_size}", "awq", linear * bpw / 8 + rest * 2,
            f"{bpw:.3f} bits/w on Linear layers (+fp16 scale and {bits}-bit zero per {group_size}), rest 16-bit",
            kinds=("nvidia",), active_bytes=(linear - inactive) * bpw / 8 + rest * 2)
        p.rows[-1].bits = bits
    from quantkit.ggufio import shard_count

    for t in GGUF_COMMON:
        bpw, src = GGUF_TYPES[t].bits_per_weight()
        add(f"GGUF {t}", "gguf", total * bpw / 8, src, active_bytes=active * bpw / 8)
        p.rows[-1].shards = shard_count(p.rows[-1].weight_bytes)

    dl = 0 if local else p.checkpoint_bytes
    f16 = total * 2
    q4 = p.row("GGUF Q4_K_M").weight_bytes
    p.needs["gguf"] = Need(disk_bytes=int(dl + f16 + q4 + GiB), ram_bytes=int(p.largest_tensor_bytes + 2 * GiB),
                           note="download + F16 GGUF + one Q4_K_M (add each further type); converter streams")
    p.needs["gguf+imatrix"] = Need(disk_bytes=int(dl + f16 + q4 + GiB), ram_bytes=int(f16 + 2 * GiB),
                                   note="the importance matrix runs the whole model once")
    int4 = p.row(f"INT4 AWQ/GPTQ g{group_size}").weight_bytes
    for m in ("awq", "gptq"):
        p.needs[m] = Need(disk_bytes=int(dl + int4 + GiB), ram_bytes=int(total * 2 + 2 * GiB),
                          note="download + INT4 output; model loaded in 16-bit, quantised layer by layer")
    p.reference = _reference_need(config, tensors, counts, a["hidden"])
    for n in p.needs.values():  # every job verifies against the base's reference
        n.ram_bytes = max(n.ram_bytes, p.reference.ram_bytes)
    return p


def _reference_need(config: dict, tensors: dict | None, counts: dict, hidden: int) -> Need:
    """RAM of the base's reference distribution over ``EVAL_MAX_TOKENS`` tokens (fp32 in transformers): a layer at a
    time when its parameters are its checkpoint's tensors, else the whole model."""
    from quantkit.engines.hf_stream import reference_bytes, stream_check_config
    from quantkit.formats import EVAL_MAX_TOKENS

    ok, why = stream_check_config(config, list(tensors) if tensors else None)
    if ok:
        return Need(disk_bytes=0, ram_bytes=reference_bytes(counts["block"], hidden, EVAL_MAX_TOKENS),
                    note=f"verify/eval in transformers fp32, a layer at a time ({EVAL_MAX_TOKENS} tokens)")
    return Need(disk_bytes=0, ram_bytes=reference_bytes(counts["total"], hidden, EVAL_MAX_TOKENS),
                note=f"verify/eval in transformers fp32, the whole model: {why}")


def plan(model: str, *, context: int = 8192, batch: int = 1, revision: str | None = None,
         group_size: int = 128) -> Plan:
    """Size MODEL (Hub id, local folder, or ``builtin:NAME``) for every common format; see the module doc."""
    name, config, tensors, size, local = load_inputs(model, revision)
    p = plan_from_config(config, model=name, tensors=tensors, checkpoint_bytes=size, local=local,
                         context=context, batch=batch, group_size=group_size)
    checked_here(p, group_size)
    return p


def checked_here(p: Plan, group_size: int) -> None:
    """Fill each row's ``checked_by``: llama.cpp for GGUF; for the HF formats vLLM where this machine's vLLM
    can run the scheme (:func:`quantkit.vllm.can_run_scheme`), else transformers, with ``not_in_vllm`` why."""
    from quantkit.formats import QuantScheme
    from quantkit.vllm import can_run_scheme

    for r in p.rows:
        if r.method == "gguf":
            r.checked_by = "llama.cpp"
            continue
        scheme = QuantScheme("hf" if r.bits is None else "compressed-tensors", bits=r.bits, group_size=group_size,
                             sym=True, moe=bool(p.experts))
        ok, label_or_why = can_run_scheme(scheme)
        r.checked_by, r.not_in_vllm = (label_or_why, None) if ok else ("transformers", label_or_why)
