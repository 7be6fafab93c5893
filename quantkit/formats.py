"""Facts about the formats quantkit makes, as tables (the way gguf-py's ``constants.py`` holds them).

* :data:`GGUF_TYPES`: one row per llama-quantize type name: its llama file type (``LLAMA_FTYPE_*``), the ggml
  tensor type most of its tensors get, whether it needs an importance matrix, its aliases and the advice line
  the model card shows. Bits per weight are computed from gguf-py's ``GGML_QUANT_SIZES``, never typed in.
* :data:`HF_METHODS` / :data:`HF_FORMATS`: what ``quantkit awq`` / ``quantkit gptq`` accept (bits, group sizes,
  output formats, sym / act_order / damp defaults) and which engine writes each format.

The CLI choices, recipe validation, plan, quantisers and cards all read these rows: adding a type is one row.
Nothing here imports an engine (``gguf`` is imported only when a size is asked for), so ``--help`` stays fast.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from functools import lru_cache

from quantkit.errors import QuantkitError

# ------------------------------------------------------------------------------------------------ GGUF

LLAMA3_8B_PARAMS = 8_030_261_248  # what quantize.cpp's "<size>G @ Llama-3-8B" figures refer to
_GIB = 1 << 30


@dataclass(frozen=True)
class GGUFType:
    """One llama-quantize type (``llama-quantize --help`` lists the same names)."""

    name: str              # "Q4_K_M"
    ftype: int             # LLAMA_FTYPE_MOSTLY_* in llama.h (gguf-py: LlamaFileType)
    ggml_type: str         # default tensor type of this file type (llama-quant.cpp llama_ftype_get_default_type)
    imatrix: bool = False  # refuse without an importance matrix
    aliases: tuple[str, ...] = ()
    advice: str = ""       # the model card's "use it when" line
    size_8b_gib: float | None = None  # quantize.cpp QUANT_OPTIONS size at Llama-3-8B (mixes: whole-file average)

    @property
    def block_bits_per_weight(self) -> float | None:
        """Bits per weight of :attr:`ggml_type` from gguf-py's ``GGML_QUANT_SIZES`` (None: gguf-py lacks it)."""
        return _block_bpw(self.ggml_type)

    def bits_per_weight(self) -> tuple[float | None, str]:
        """(bits per weight of a whole file, where the number comes from): quantize.cpp's measured size for
        the K mixes (which keep some tensors at a higher type), else the block size of the tensor type."""
        if self.size_8b_gib is not None:
            return (round(self.size_8b_gib * _GIB * 8 / LLAMA3_8B_PARAMS, 3),
                    f"quantize.cpp: {self.size_8b_gib} GiB @ Llama-3-8B")
        block, size = quant_size(self.ggml_type)
        if not block:
            return None, "unknown to gguf-py"
        return size * 8 / block, f"ggml block: {size} bytes / {block} weights"


# Which types need an importance matrix: llama.cpp (src/llama-quant.cpp, tensor_requires_imatrix) refuses
# IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S (and so IQ2_M), IQ3_XXS, and Q2_K inside a Q2_K_S file -- after the whole
# conversion, so quantkit checks first. quantkit also asks for one for the other IQ types, which lose much more
# than K types of the same size without it.
_ROWS = [
    GGUFType("F32", 0, "F32", advice="full precision; reference only"),
    GGUFType("F16", 1, "F16", advice="full precision; reference, or to quantise yourself"),
    GGUFType("BF16", 32, "BF16", advice="full precision; reference, or to quantise yourself"),
    GGUFType("Q8_0", 7, "Q8_0", advice="near-lossless; if you have the RAM"),
    GGUFType("Q5_0", 8, "Q5_0"),
    GGUFType("Q5_1", 9, "Q5_1"),
    GGUFType("Q4_0", 2, "Q4_0", advice="legacy 4-bit; prefer Q4_K_M"),
    GGUFType("Q4_1", 3, "Q4_1"),
    GGUFType("Q6_K", 18, "Q6_K", advice="very high quality, near-lossless"),
    GGUFType("Q5_K_M", 17, "Q5_K", aliases=("Q5_K",), advice="high quality; recommended when it fits",
             size_8b_gib=5.33),
    GGUFType("Q5_K_S", 16, "Q5_K", advice="high quality, a little smaller", size_8b_gib=5.21),
    GGUFType("Q4_K_M", 15, "Q4_K", aliases=("Q4_K",), advice="good quality, the usual default; recommended",
             size_8b_gib=4.58),
    GGUFType("Q4_K_S", 14, "Q4_K", advice="a little smaller than Q4_K_M, slightly lower quality", size_8b_gib=4.37),
    GGUFType("Q3_K_L", 13, "Q3_K", advice="low RAM; noticeably lower quality", size_8b_gib=4.03),
    GGUFType("Q3_K_M", 12, "Q3_K", aliases=("Q3_K",), advice="low RAM; noticeably lower quality", size_8b_gib=3.74),
    GGUFType("Q3_K_S", 11, "Q3_K", advice="low RAM; low quality", size_8b_gib=3.41),
    GGUFType("Q2_K", 10, "Q2_K", advice="very low quality; only when nothing else fits", size_8b_gib=2.96),
    GGUFType("Q2_K_S", 21, "Q2_K", imatrix=True, size_8b_gib=2.96),
    GGUFType("IQ4_XS", 30, "IQ4_XS", imatrix=True, advice="smaller than Q4_K_S at similar quality"),
    GGUFType("IQ4_NL", 25, "IQ4_NL", imatrix=True, advice="4-bit non-linear; good on ARM"),
    GGUFType("IQ3_M", 27, "IQ3_S", imatrix=True, advice="low RAM; usable"),
    GGUFType("IQ3_S", 26, "IQ3_S", imatrix=True),
    GGUFType("IQ3_XS", 22, "IQ3_S", imatrix=True, advice="low RAM; lower quality"),
    GGUFType("IQ3_XXS", 23, "IQ3_XXS", imatrix=True),
    GGUFType("IQ2_M", 29, "IQ2_S", imatrix=True, advice="very low quality; surprisingly usable"),
    GGUFType("IQ2_S", 28, "IQ2_XS", imatrix=True),
    GGUFType("IQ2_XS", 20, "IQ2_XS", imatrix=True),
    GGUFType("IQ2_XXS", 19, "IQ2_XXS", imatrix=True),
    GGUFType("IQ1_M", 31, "IQ1_M", imatrix=True),
    GGUFType("IQ1_S", 24, "IQ1_S", imatrix=True),
    GGUFType("TQ1_0", 36, "TQ1_0"),
    GGUFType("TQ2_0", 37, "TQ2_0"),
    GGUFType("MXFP4_MOE", 38, "MXFP4"),
    GGUFType("NVFP4", 39, "NVFP4"),
    GGUFType("Q1_0", 40, "Q1_0"),
    GGUFType("Q2_0", 41, "Q2_0"),
]
#: llama-quantize type name -> row, in the order error messages list them
GGUF_TYPES: dict[str, GGUFType] = {r.name: r for r in _ROWS}
GGUF_ALIASES: dict[str, str] = {a: r.name for r in _ROWS for a in r.aliases}
GGUF_BY_FTYPE: dict[int, GGUFType] = {r.ftype: r for r in _ROWS}


def gguf_type(name) -> GGUFType:
    """The row for a type as a user writes it: ``q4_k_m``, ``Q4-K-M``, `` Q4_K `` (alias) -> Q4_K_M's row."""
    key = str(name).strip().upper().replace("-", "_")
    key = GGUF_ALIASES.get(key, key)
    row = GGUF_TYPES.get(key)
    if row is None:
        close = difflib.get_close_matches(key, list(GGUF_TYPES), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise QuantkitError(f"unknown GGUF type {key!r}{hint}; allowed: {', '.join(GGUF_TYPES)}")
    return row


def gguf_spec(name) -> tuple[str, bool]:
    """A ``--types`` entry -> (its canonical name, whether it needs an importance matrix): a row of
    :data:`GGUF_TYPES`, or a measured ``auto:`` mix (:func:`parse_auto`; built by :mod:`quantkit.gguf_mix`, measured
    on calibration text)."""
    if is_auto(name):
        return parse_auto(name).name, True
    row = gguf_type(name)
    return row.name, row.imatrix


def file_type_name(ftype_id: int) -> str:
    """``15`` -> ``Q4_K_M`` (a GGUF's ``general.file_type``)."""
    row = GGUF_BY_FTYPE.get(int(ftype_id))
    return row.name if row else f"ftype-{ftype_id}"


def quant_size(ggml_type: str | int) -> tuple[int, int]:
    """(weights per block, bytes per block) of a ggml tensor type, from gguf-py; (0, 0) when gguf-py lacks it."""
    import gguf

    try:
        qt = gguf.GGMLQuantizationType[ggml_type] if isinstance(ggml_type, str) else gguf.GGMLQuantizationType(
            ggml_type)
        return gguf.GGML_QUANT_SIZES[qt]
    except (KeyError, ValueError):
        return 0, 0


@lru_cache(maxsize=None)
def _block_bpw(ggml_type: str) -> float | None:
    block, size = quant_size(ggml_type)
    return size * 8 / block if block else None


# --------------------------------------------------------------------------------------------- AWQ/GPTQ

@dataclass(frozen=True)
class HFFormat:
    """An output layout of ``quantkit awq|gptq --format``."""

    name: str
    engine: str                 # who writes it
    dists: tuple[str, ...]      # distributions whose versions are recorded
    help: str = ""


@dataclass(frozen=True)
class HFMethod:
    """What one weight-only method accepts, and its defaults."""

    name: str                   # awq | gptq
    bits: tuple[int, ...]       # allowed weight bits; the first is the default
    sym: bool                   # default symmetric (no zero point)
    act_order: bool             # default activation-order column processing
    damp: float | None          # default Hessian dampening (None: the method has none)
    options: tuple[str, ...] = ()  # which of sym / act_order / damp a user may set
    formats: tuple[str, ...] = field(default_factory=lambda: tuple(HF_FORMATS))

    @property
    def title(self) -> str:
        return self.name.upper()

    @property
    def default_bits(self) -> int:
        return self.bits[0]


HF_FORMATS: dict[str, HFFormat] = {f.name: f for f in (
    HFFormat("classic", "GPTQModel", ("gptqmodel", "transformers", "torch", "optimum"),
             "quant_method awq|gptq (vLLM, TGI, SGLang, transformers)"),
    HFFormat("compressed-tensors", "llm-compressor", ("llmcompressor", "compressed-tensors", "transformers", "torch"),
             "vLLM's native format (llm-compressor)"),
)}
DEFAULT_HF_FORMAT = "classic"
HF_METHODS: dict[str, HFMethod] = {m.name: m for m in (
    HFMethod("awq", bits=(4,), sym=False, act_order=False, damp=None),
    HFMethod("gptq", bits=(4, 8), sym=True, act_order=True, damp=0.01, options=("sym", "act_order", "damp")),
)}
DEFAULT_GROUP_SIZE = 128
MIN_GROUP_SIZE = 16
#: ``quantkit eval --max-tokens`` by default (and what ``plan`` sizes the base's reference for)
EVAL_MAX_TOKENS = 32768
#: ``--engine`` / recipe ``engine:`` of HF-format variants: vLLM where this machine's vLLM can run the scheme,
#: else transformers (auto); or one of them.
HF_ENGINES = ("auto", "vllm", "transformers")


def group_size_problem(group_size) -> str | None:
    """Why a group size is not allowed (``None`` when it is): a power of two >= 16, or -1 (one scale per
    output channel). Whether it also divides the model's matrices is :func:`check_group_size`."""
    if group_size == -1:
        return None
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < MIN_GROUP_SIZE \
            or group_size & (group_size - 1):
        return (f"must be a power of two >= {MIN_GROUP_SIZE}, or -1 for one scale per channel "
                f"(got {group_size})")
    return None


def check_group_size(stats: dict, group_size: int, model: str) -> None:
    """Every quantised matrix's input width must be a whole number of groups: the serving kernels (Marlin,
    ExLlama, the CPU int4 kernels) reject a partial last group, so refuse before hours of calibration."""
    if group_size == -1 or not stats.get("in_features"):
        return
    bad = {k: v for k, v in stats["in_features"].items() if k % group_size}
    if bad:
        width, name = sorted(bad.items())[0]
        ok = group_size
        while ok > 16 and any(k % ok for k in stats["in_features"]):
            ok //= 2
        hint = f"use --group-size {ok}" if all(k % ok == 0 for k in stats["in_features"]) else "use --group-size -1"
        raise QuantkitError(f"--group-size {group_size} does not divide the input width {width} of {name} in {model} "
                            f"(serving kernels need whole groups): {hint}")


def hf_param_problems(method: str, *, bits=None, group_size=None, fmt=None) -> dict[str, str]:
    """``{parameter: what is wrong}`` for the parameters given (empty when all are allowed); shared by the
    quantisers (before any download) and ``quantkit recipe check``."""
    m = HF_METHODS[method]
    out: dict[str, str] = {}
    if fmt is not None and fmt not in HF_FORMATS:
        out["format"] = f"must be one of {', '.join(HF_FORMATS)} (got {fmt!r})"
    if bits is not None and bits not in m.bits:
        out["bits"] = f"must be one of {', '.join(map(str, m.bits))} for {m.title} (got {bits})"
    if group_size is not None:
        p = group_size_problem(group_size)
        if p:
            out["group_size"] = p
    return out


# ------------------------------------------------------------------------------------- vLLM's limits

@dataclass(frozen=True)
class QuantScheme:
    """What a saved HF-format checkpoint asks of a serving engine, read from its ``config.json``
    (:func:`quantkit.vllm.read_scheme`): the facts vLLM's quantisation configs check."""

    format: str                     # awq | gptq | compressed-tensors | hf (unquantised)
    bits: int | None = None         # weight bits (None: unquantised)
    group_size: int | None = None   # -1: one scale per output channel
    sym: bool | None = None
    desc_act: bool = False          # GPTQ dynamic activation ordering (classic ``desc_act``)
    weight_only: bool = True        # no activation quantisation (W*A16)
    moe: bool = False               # routed experts


@dataclass(frozen=True)
class VLLMLimit:
    """One thing vLLM does not serve, and where (:data:`VLLM_DEVICES`). A row for every device is a refusal of
    vLLM's own (quantkit does not write it; an artifact that has it fails its check with vLLM's reason); a row
    for some devices is a missing kernel there (such an artifact is checked in transformers instead, and the
    record says why)."""

    where: tuple[str, ...]
    applies: object                 # QuantScheme -> bool
    reason: str
    source: str                     # where in vLLM this was read
    fix: str = ""                   # what to use instead (for quantkit's own up-front refusal)


#: Kinds of machine vLLM runs on, as :func:`quantkit.vllm.device_kind` names them.
VLLM_DEVICES = ("cuda", "cpu-x86", "cpu-x86-avx2", "cpu-arm")
_X86 = ("cpu-x86", "cpu-x86-avx2")  # cpu-x86-avx2: an x86 CPU without AVX512 (vLLM loads its _C_AVX2 there)
_CPU = (*_X86, "cpu-arm")

#: What vLLM (0.32, CPU and CUDA builds) accepts, read in its own checks; each row names the function.
VLLM_LIMITS: tuple[VLLMLimit, ...] = (
    VLLMLimit(VLLM_DEVICES, lambda s: s.format == "gptq" and s.desc_act and s.group_size not in (None, -1),
              "GPTQ group activation ordering (desc_act=True) with grouped scales is no longer supported by vLLM",
              "vllm/model_executor/layers/quantization/utils/gptq_utils.py normalize_and_validate_gptq_desc_act",
              "use --no-act-order (GPTQModel's group-aware ordering, desc_act false) or --format "
              "compressed-tensors (static activation order)"),
    VLLMLimit(_CPU, lambda s: s.bits is not None and s.weight_only and s.bits != 4,
              "vLLM's CPU build has 4-bit weight-only kernels only (CPUWNA16: uint4, uint4b8), no "
              "8-bit weight-only", "vllm/model_executor/kernels/linear/mixed_precision/cpu.py"),
    VLLMLimit(("cpu-x86-avx2",), lambda s: s.bits is not None,
              "vLLM's CPU build on an x86 CPU without AVX512 loads its _C_AVX2 extension, which has no W4A16 kernel "
              "(cpu_gemm_wna16)", "vllm/platforms/cpu.py (vllm._C_AVX512 only where torch.cpu._is_avx512_supported())"),
    VLLMLimit(_X86, lambda s: s.bits is not None and s.moe,
              "vLLM's CPU W4A16 MoE kernel is Arm-only (\"No WNA16 MoE backend supports the deployment "
              "configuration\" on x86)", "vllm/model_executor/layers/fused_moe (CPU WNA16 MoE backends)"),
    VLLMLimit(_CPU, lambda s: s.bits is not None and s.group_size not in (None, -1) and s.group_size % 2,
              "vLLM's CPU WNA16 kernel needs an even group size", "vllm/.../mixed_precision/cpu.py can_implement"),
)


def vllm_refusal(scheme: QuantScheme, device: str | None = None) -> VLLMLimit | None:
    """The first row of :data:`VLLM_LIMITS` that keeps vLLM on ``device`` (one of :data:`VLLM_DEVICES`; None:
    only what vLLM refuses everywhere) from serving ``scheme``, or None."""
    for lim in VLLM_LIMITS:
        here = set(lim.where) == set(VLLM_DEVICES) if device is None else device in lim.where
        if here and lim.applies(scheme):
            return lim
    return None


def written_scheme(method: str, fmt: str, *, bits: int, group_size: int, sym: bool | None = None) -> QuantScheme:
    """What ``quantkit awq|gptq`` writes for these parameters: classic GPTQ's ``--act-order`` is GPTQModel's
    group-aware ordering (``desc_act: false``), compressed-tensors' is ``actorder: static``."""
    return QuantScheme(format=method if fmt == "classic" else "compressed-tensors", bits=bits,
                       group_size=group_size, sym=sym, desc_act=False)


# ------------------------------------------------------------------------------------------ auto: mixes
# The spelling of a measured GGUF mix (built by quantkit.gguf_mix): auto:PRESET, auto:BITSbpw, auto:SIZE.
PREFIX = "auto:"
_UNITS = {"bpw": None, "gb": 1e9, "gib": 1 << 30, "mb": 1e6, "mib": 1 << 20}
_SPEC = re.compile(r"^([0-9]*\.?[0-9]+)\s*(bpw|gb|gib|mb|mib)$", re.I)
# the K mixes an auto: spec may name, and the file type a size budget borrows (largest whose size fits)
MIX_PRESETS = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0")


@dataclass(frozen=True)
class AutoSpec:
    """A parsed ``auto:`` type."""

    preset: str | None = None    # auto:Q4_K_M -> "Q4_K_M"
    bpw: float | None = None     # auto:4.5bpw
    size: int | None = None      # auto:3.2GB -> bytes

    @property
    def label(self) -> str:
        if self.preset:
            return self.preset
        if self.bpw is not None:
            return f"{self.bpw:g}bpw"
        return _size_label(self.size)

    @property
    def name(self) -> str:
        return PREFIX + self.label

    def file_type(self, n_params: int) -> str:
        """The llama file type written into the header (the preset, or the largest K mix whose size fits)."""
        if self.preset:
            return self.preset
        bpw = self.bpw if self.bpw is not None else self.size * 8 / max(n_params, 1)
        fits = [p for p in MIX_PRESETS if (GGUF_TYPES[p].bits_per_weight()[0] or 99) <= bpw]
        return fits[-1] if fits else MIX_PRESETS[0]


def _size_label(n: int) -> str:
    unit, f = ("GB", 1e9) if n >= 1e9 else ("MB", 1e6)
    return f"{n / f:.9f}".rstrip("0").rstrip(".") + unit  # exact: the label is parsed again


def is_auto(spec) -> bool:
    return str(spec).strip().lower().startswith(PREFIX)


def parse_auto(spec: str) -> AutoSpec:
    """``auto:Q4_K_M`` / ``auto:4.5bpw`` / ``auto:3.2GB`` (also MB, GiB, MiB) -> :class:`AutoSpec`."""
    raw = str(spec).strip()
    body = raw[len(PREFIX):].strip()
    how = ("use auto:PRESET (one of " + ", ".join(MIX_PRESETS) + "), auto:BITSbpw (e.g. auto:4.5bpw) or "
           "auto:SIZE (e.g. auto:3.2GB, auto:90MB)")
    m = _SPEC.match(body)
    if m:
        value, unit = float(m.group(1)), m.group(2).lower()
        if value <= 0:
            raise QuantkitError(f"bad GGUF type {raw!r}: the budget must be positive; {how}")
        if unit == "bpw":
            if not 2.0 <= value <= 8.5:
                raise QuantkitError(f"bad GGUF type {raw!r}: bits per weight must be between 2 and 8.5; {how}")
            return AutoSpec(bpw=value)
        return AutoSpec(size=round(value * _UNITS[unit]))
    try:
        row = gguf_type(body) if body else None
    except QuantkitError:
        row = None
    if row is None or row.name not in MIX_PRESETS:
        raise QuantkitError(f"bad GGUF type {raw!r}: {how}")
    return AutoSpec(preset=row.name)


# ------------------------------------------------------------------------------------ MoE checkpoint layouts

@dataclass(frozen=True)
class MoELayout:
    """How a routed-expert (MoE) architecture's checkpoint names its experts, as vLLM's loader for it reads them
    (``vllm/model_executor/models/<file>``, vLLM 0.32): per layer ``model.layers.L.<block>.experts.E.<proj>.*``
    for every expert E and projection, never one fused tensor for all experts; the router (and
    ``unquantised``) stay 16-bit (vLLM builds them with ``GateLinear`` / ``quant_config=None``).
    ``module_projs`` are the names transformers' modules (and llm-compressor's 2-D experts) use for gate, up
    and down when they differ from the checkpoint's (Mixtral's ``w1/w3/w2``)."""

    model_type: str
    block: str                              # the module holding experts and router in the checkpoint
    projs: tuple[str, str, str]             # checkpoint names of gate, up, down
    source: str                             # where in vLLM this was read
    router: str = "gate"
    unquantised: tuple[str, ...] = ()       # other per-layer modules vLLM loads unquantised
    shared: str | None = None               # the shared expert(s) module (dense MLP, quantised like attention)
    module_projs: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")


_GUD = ("gate_proj", "up_proj", "down_proj")
#: model_type -> layout; an MoE architecture without a row is refused for the GPU formats (hfquant)
MOE_LAYOUTS: dict[str, MoELayout] = {r.model_type: r for r in (
    MoELayout("mixtral", "block_sparse_moe", ("w1", "w3", "w2"),
              "mixtral.py: MixtralMoE (GateLinear gate, FusedMoE ckpt_names w1/w2/w3)"),
    MoELayout("qwen2_moe", "mlp", _GUD, "qwen2_moe.py: Qwen2MoeSparseMoeBlock (GateLinear gate, "
              "shared_expert_gate quant_config=None, FusedMoE gate_proj/down_proj/up_proj)",
              unquantised=("shared_expert_gate",), shared="shared_expert"),
    MoELayout("qwen3_moe", "mlp", _GUD, "qwen3_moe.py: Qwen3MoeSparseMoeBlock (GateLinear gate, FusedMoE "
              "gate_proj/down_proj/up_proj)"),
    MoELayout("deepseek_v2", "mlp", _GUD, "deepseek_v2.py: DeepseekV2MoE (GateLinear gate) and load_weights "
              "(make_expert_params_mapping gate_proj/down_proj/up_proj)", shared="shared_experts"),
    MoELayout("deepseek_v3", "mlp", _GUD, "deepseek_v2.py (DeepseekV3ForCausalLM): as deepseek_v2, plus the "
              "gate's e_score_correction_bias", shared="shared_experts"),
)}

#: Why an MoE model's compressed-tensors variant is written symmetric whatever the method's default (AWQ is
#: asymmetric elsewhere): transformers 5.17 loads per-expert packed tensors into its fused 3-D experts through
#: ``DecompressExperts``, which has no zero point (measured on a tiny Mixtral, AWQ asymmetric: "Asymmetric quant
#: requires zero-point values", the load fails); vLLM's WNA16 MoE kernels take either.
MOE_CT_SYMMETRIC = ("MoE experts in compressed-tensors are quantised symmetric: transformers' loader of per-expert "
                    "tensors (DecompressExperts) has no zero point")
