"""Shared machinery of ``quantkit awq`` and ``quantkit gptq``: one calibrated, weight-only quantised variant of a
Hugging Face model in one output folder.

Two engines, chosen by ``--format``:

* ``classic`` (default): GPTQModel writes the ``quant_method: awq|gptq`` layout that vLLM, TGI, SGLang,
  transformers (with gptqmodel) and ExLlama read.
* ``compressed-tensors``: llm-compressor's ``oneshot`` (GPTQModifier / AWQModifier) writes vLLM's native
  ``quant_method: compressed-tensors`` (``pack-quantized``), which transformers also loads with the
  ``compressed-tensors`` package alone.

Each run builds the folder under a temporary sibling name (``.<name>.<random>.partial``) and renames it onto
the final name only when weights, config, tokenizer, ``quantkit-recipe.json`` and ``quantkit.json`` are all
written; a re-run finds a complete, intact folder with the same parameters and returns it untouched.

Engine quirks handled here (measured with gptqmodel 7.6.0 / llmcompressor 0.14 on CPU-only torch):

* gptqmodel sizes its CPU worker pool to ``(cores+1)//2``, which stalls on a 2-core box: we default
  ``GPTQMODEL_CPU_WORKERS`` to at least 2 (an explicit value in the environment wins).
* gptqmodel compiles C++ kernels into ``~/.cache``: ``GPTQMODEL_TORCH_EXTENSIONS_DIR`` defaults to
  ``<quantkit cache>/torch_extensions``.
* gptqmodel writes its per-layer logs into ``./logs/`` of the current directory: redirected (only while it
  runs) to ``<quantkit cache>/logs/gptqmodel``.
* gptqmodel records a random temporary path (``meta.offload_to_disk_path``) in ``config.json`` and
  ``quantize_config.json``: removed, so two runs with the same inputs write the same configs; its disk
  offload goes into the work folder instead of ``/tmp`` (so the disk check covers it) and is deleted there.
* gptqmodel AWQ on a machine without an accelerator needs ``backend=BACKEND.AWQ_TORCH``.
* gptqmodel's AWQ searches a clipping range per weight group after the scales (AutoAWQ's ``apply_clip``, fitted on
  512 calibration tokens, always on: no setting turns it off); llm-compressor's AWQ has no such search. It is
  turned off (:data:`AWQ_CLIP_SEARCH`, recorded in the params): on the continuous SmolLM2 (4-bit, g64, 32 x 256
  calibration tokens) it raised the KLD from 0.166 to 0.243 on the eval text and from 0.299 to 0.548 on unseen
  prose, worse there than round-to-nearest (0.526); without it classic AWQ matches llm-compressor's (0.160 /
  0.296). Loading in float16 instead of GPTQModel's CPU default bfloat16 changed nothing measurable
  (``benchmarks/hf_ablation.md``).
* llm-compressor's AWQ pins its cached activations with ``Tensor.pin_memory()``, which raises
  "Cannot access accelerator device" on CPU-only torch. Pinning only speeds host-to-device copies, so while
  ``oneshot`` runs on a machine where ``torch.accelerator.is_available()`` is false, quantkit replaces
  ``IntermediatesCache.pin_memory`` with a no-op and restores it afterwards (a scoped patch, no fork).
* Engines print to stdout; while they run, stdout goes to stderr so ``--json`` output stays parseable.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from quantkit import moe, trust
from quantkit.errors import QuantkitError
from quantkit.formats import (
    DEFAULT_HF_FORMAT,
    HF_FORMATS,
    HF_METHODS,
    MOE_CT_SYMMETRIC,
    check_group_size,
    hf_param_problems,
    vllm_refusal,
    written_scheme,
)
from quantkit.moe import moe_experts, moe_layers
from quantkit.util import (
    Timer,
    cache_home,
    default_threads,
    file_lock,
    folder_lock_file,
    format_table,
    human_size,
    now_iso,
    safetensors_tensors,
    stdout_to_stderr,
    versions,
)
from quantkit.verify import raise_if_failed, verify_recorded, verify_status

if TYPE_CHECKING:
    from quantkit.hub import ModelSource

DEFAULT_FORMAT = DEFAULT_HF_FORMAT
RECIPE_NAME = "quantkit-recipe.json"
LICENSE_GLOBS = ("LICENSE*", "LICENCE*", "license*", "NOTICE*", "USE_POLICY.md")
TABLE_HEADERS = ["variant", "format", "bits", "group", "size", "calib tokens", "seconds", "status", "verify"]
_GB = 1e9
# Safetensors shards of the saved weights (``model.safetensors.index.json`` + ``model-0000i-of-0000n``), set
# explicitly for both engines: the Hub's and vLLM's usual shard size (transformers 5's own default is 50GB,
# gptqmodel's 4GB in binary units), small enough to resume downloads and load shard by shard.
MAX_SHARD_SIZE = "5GB"


@dataclass
class QuantResult:
    """What ``quantize_awq`` / ``quantize_gptq`` return."""

    folder: Path
    name: str
    manifest: "object"  # quantkit.manifest.Manifest
    cached: bool = False
    messages: list[str] = field(default_factory=list)

    @property
    def artifact(self) -> dict:
        return self.manifest.artifact(self.name)

    def table_rows(self) -> list[list]:
        a = self.artifact
        cal = a.get("calibration") or {}
        return [[self.name, a["format"], a["bits"], a["group_size"], human_size(a["size"]),
                 cal.get("token_count"), f"{a['seconds']:.1f}", "cached" if self.cached else "built",
                 verify_status(a)]]

    def table(self) -> str:
        return format_table(self.table_rows(), TABLE_HEADERS)

    def to_json(self) -> dict:
        return {"name": self.name, "folder": str(self.folder), "cached": self.cached,
                "artifact": self.artifact, "base": self.manifest.base}


# -- names and parameters -----------------------------------------------------------------------

def variant_name(model_name: str, method: str, fmt: str, bits: int, group_size: int, sym: bool = True) -> str:
    """``SmolLM2-135M-AWQ-INT4-g128`` (classic) / ``SmolLM2-135M-GPTQ-W8A16-g128`` (compressed-tensors)."""
    kind = f"INT{bits}" if fmt == "classic" else f"W{bits}A16"
    group = "ch" if group_size == -1 else f"g{group_size}"
    asym = "-asym" if ("sym" in HF_METHODS[method].options and not sym) else ""  # AWQ is always asymmetric
    return f"{model_name}-{method.upper()}-{kind}-{group}{asym}"


def check_params(method: str, *, bits: int, group_size: int, fmt: str, samples: int, seq_len: int,
                 damp: float | None = None) -> None:
    """Refuse parameters the method does not allow (the rules live in :mod:`quantkit.formats`)."""
    for param, problem in hf_param_problems(method, bits=bits, group_size=group_size, fmt=fmt).items():
        raise QuantkitError(f"--{param.replace('_', '-')} {problem}")
    if samples < 1:
        raise QuantkitError(f"--samples must be at least 1 (got {samples})")
    if seq_len < 16:
        raise QuantkitError(f"--seq-len must be at least 16 (got {seq_len})")
    if damp is not None and not (0 < damp < 1):
        raise QuantkitError(f"--damp must be between 0 and 1, e.g. 0.01 (got {damp})")
    lim = vllm_refusal(written_scheme(method, fmt, bits=bits, group_size=group_size))
    if lim is not None:  # never write what vLLM refuses to load
        raise QuantkitError(f"{method} {fmt} would write a checkpoint vLLM refuses ({lim.reason}): {lim.fix}")


# -- architectures: MoE, fused layers, what an engine cannot do (issue 9) ---------------------------

# Why an engine cannot make a loadable artifact of an architecture, and what works instead; measured with
# transformers 5.17, gptqmodel 7.6.0, llm-compressor 0.14 (tests/test_arch_matrix.py). A refusal comes right
# after the model's config is read, before calibration data or any engine work.
_CLASSIC_MOE = ("transformers 5 holds MoE experts as fused 3-D tensors and cannot load gptqmodel's per-expert "
                "qweight/qzeros/scales (reported UNEXPECTED: the experts would stay random)")
_CT_NO_LAYOUT = ("quantkit has no measured expert layout for this MoE architecture (formats.MOE_LAYOUTS: the "
                 "names transformers and vLLM read its experts under), so the saved experts could load random")
_PHI3_CLASSIC = ("gptqmodel's defuser splits Phi-3's fused gate_up_proj and saves mlp.gate_proj/up_proj, which "
                 "transformers does not load (gate_up_proj stays MISSING and the CPU kernel then fails in "
                 "_build_ret_idx); use --format compressed-tensors, or quantkit gguf")
# (model_type, method, format) -> reason, for dense architectures; MoE models follow the two rules in
# unsupported_reason (classic: never; compressed-tensors: where formats.MOE_LAYOUTS has the architecture).
UNSUPPORTED: dict[tuple[str, str, str], str] = {
    ("phi3", "gptq", "classic"): _PHI3_CLASSIC, ("phi3", "awq", "classic"): _PHI3_CLASSIC,
}


def unsupported_reason(config: dict, method: str, fmt: str) -> str | None:
    """Why ``method``/``fmt`` cannot make a loadable artifact of this model, or None."""
    mt = moe.model_type(config)
    if (mt, method, fmt) in UNSUPPORTED:
        return UNSUPPORTED[(mt, method, fmt)]
    if not moe_experts(config):
        return None
    known = moe.layout(config) is not None
    if fmt == "classic":
        return _CLASSIC_MOE + ("; use --format compressed-tensors, or quantkit gguf" if known
                               else "; use quantkit gguf")
    if not known:
        return _CT_NO_LAYOUT + "; use quantkit gguf"
    return None


def check_architecture(config: dict, method: str, fmt: str) -> None:
    """Refuse (one line) an architecture x method x format the engines cannot make a loadable artifact of."""
    reason = unsupported_reason(config, method, fmt)
    if reason:
        raise QuantkitError(f"{method.upper()} --format {fmt} is not supported for {moe.model_type(config)} "
                            f"models: {reason}")


def moe_settings(config: dict) -> dict:
    """What quantkit.json / quantkit-recipe.json record about a MoE model's calibration ({} for a dense one)."""
    experts = moe_experts(config)
    if not experts:
        return {}
    return {"experts": experts, "layers": moe_layers(config),
            "calibration": "all experts (llm-compressor moe_calibrate_all_experts): every expert is fed "
                           "every calibration token"}


expert_token_counts = moe.expert_token_record


# -- sizes and resources ------------------------------------------------------------------------

def weight_stats(folder: Path) -> dict:
    """Sizes from the safetensors headers (no weights read): bytes on disk, parameter counts, and how many
    of them sit in 2-D ``layers`` matrices (what AWQ/GPTQ quantise; embeddings, norms, lm_head stay 16-bit)."""
    files = sorted(folder.glob("*.safetensors"))
    stats = {"bytes": 0, "params": 0, "quantisable_params": 0, "largest_matrix_bytes": 0, "in_features": {}}
    if not files:  # pickle weights (--allow-pickle): sizes only
        b = sum(p.stat().st_size for p in folder.glob("pytorch_model*.bin"))
        return {"bytes": b, "params": b // 2, "quantisable_params": int(b // 2 * 0.9), "largest_matrix_bytes": 0,
                "in_features": {}}
    stats["bytes"] = sum(p.stat().st_size for p in files)
    for name, _dtype, shape, nbytes in safetensors_tensors(folder):
        count = math.prod(shape)
        stats["params"] += count
        if len(shape) == 2 and ".layers." in f".{name}" and "embed" not in name:
            stats["quantisable_params"] += count
            stats["in_features"].setdefault(int(shape[1]), name)
            stats["largest_matrix_bytes"] = max(stats["largest_matrix_bytes"], nbytes)
    return stats


def _check_group_size_from_headers(model: str, revision: str | None, group_size: int) -> None:
    """For a Hub id, the width check on its config and safetensors headers, before the download (a local folder
    is checked from its own files, after the cache lookup)."""
    from quantkit.hub import is_local

    if group_size == -1 or not isinstance(model, str) or model.startswith("builtin:") or is_local(model):
        return
    from quantkit.plan import plan

    try:
        p = plan(model, revision=revision)
    except Exception:  # offline, gated, no config: the same check runs on the files after the download
        return
    p.check_group_size(group_size)


def estimate_output_bytes(stats: dict, bits: int, group_size: int) -> int:
    q = stats["quantisable_params"]
    other = stats["params"] - q
    g = group_size if group_size > 0 else 4096
    scales = q / g * (2 + bits / 8)  # one 16-bit scale + one packed zero point per group
    return int(q * bits / 8 + scales + other * 2)


def resource_needs(stats: dict, *, method: str, fmt: str, bits: int, group_size: int, offload: bool,
                   gpu_bytes: int = 0) -> dict:
    """Disk and memory a run clearly needs, in bytes (estimates from the safetensors headers).

    * classic (gptqmodel, ``offload_to_disk``): the model is a meta-device shell whose layers are read from
      the checkpoint on demand and written to a disk offload once quantised; host RAM holds the unquantised
      embeddings/head plus a few layers. Disk: the output + the offload (the 16-bit layers).
    * compressed-tensors (llm-compressor): ``from_pretrained`` holds the whole model in host RAM in its
      stored dtype, and one decoder layer at a time goes to the GPU, if any. With ``--offload`` only what
      fits stays in RAM and the rest is spilled to disk next to the output (so disk grows by the model).
    """
    model = stats["bytes"]
    out = estimate_output_bytes(stats, bits, group_size)
    layers16 = stats["quantisable_params"] * 2
    other16 = (stats["params"] - stats["quantisable_params"]) * 2
    whole = model + int(1 * _GB)
    few_layers = min(whole, 8 * stats["largest_matrix_bytes"] + int(2 * _GB))
    if fmt == "classic":
        disk = out + layers16
        memory = min(whole, other16 + few_layers)
    else:
        disk = out + (model if offload else 0)
        memory = few_layers if offload else whole
    return {"disk": int(disk * 1.05), "memory": int(memory), "model": model, "output": out, "gpu": gpu_bytes}


def check_resources(needs: dict, *, free_disk: int, available_memory: int, where: Path) -> None:
    """Refuse to start (QuantkitError) when disk or memory is clearly insufficient."""
    if os.environ.get("QUANTKIT_SKIP_RESOURCE_CHECK"):
        return
    if free_disk < needs["disk"]:
        raise QuantkitError(
            f"not enough disk: this variant needs about {human_size(needs['disk'])} free at {where} "
            f"(output ~{human_size(needs['output'])} plus engine offload), only {human_size(free_disk)} is free; "
            "free some space or choose another --out")
    if available_memory < needs["memory"] * 0.9:
        raise QuantkitError(
            f"not enough memory: loading this {human_size(needs['model'])} model needs about "
            f"{human_size(needs['memory'])} of RAM, only {human_size(available_memory)} is available; "
            "pass --offload to spill weights to disk (--format compressed-tensors), use --format classic "
            "(streams layers from the checkpoint), or use a machine with more RAM")


def _available_memory() -> int:
    import psutil

    vm = psutil.virtual_memory()
    return int(vm.available + psutil.swap_memory().free)


# -- engine environment -------------------------------------------------------------------------

def engine_env_defaults() -> None:
    """Environment gptqmodel reads at import/first use (explicit user values win)."""
    if "GPTQMODEL_CPU_WORKERS" not in os.environ:
        cores = default_threads()
        os.environ["GPTQMODEL_CPU_WORKERS"] = str(max(2, min(12, (cores + 1) // 2)))
    os.environ.setdefault("GPTQMODEL_TORCH_EXTENSIONS_DIR", str(cache_home() / "torch_extensions"))


#: What makes a quantisation the same bytes again (quantkit-recipe.json ``reproducible``; measured on a tiny Llama:
#: 1 vs 2 torch threads give different GPTQ weights, the same thread count the same sha256).
REPRODUCIBLE = ("same bytes for the same base, parameters, calibration, engine versions and torch CPU threads "
                "(`threads`: the reductions' order depends on it); a GPU run depends on the device instead")


def torch_threads() -> int:
    """Set torch's CPU threads to quantkit's count (``QUANTKIT_THREADS``, else the cores this process may use)
    and return it: the environment (a Ray task's ``OMP_NUM_THREADS=1``) must not change the bytes written."""
    import torch

    n = default_threads()
    torch.set_num_threads(n)
    return n


@contextlib.contextmanager
def gptqmodel_logs_redirect():
    """gptqmodel writes ``./logs/<processor>_log_*.log`` into the current directory: send it to the cache."""
    from gptqmodel.looper import loop_processor

    old = loop_processor._PROJECT_LOG_DIR
    loop_processor._PROJECT_LOG_DIR = cache_home() / "logs" / "gptqmodel"
    try:
        yield
    finally:
        loop_processor._PROJECT_LOG_DIR = old


#: Whether classic AWQ (GPTQModel) searches a clipping range per group; see the module docstring for why not.
AWQ_CLIP_SEARCH = False


@contextlib.contextmanager
def gptqmodel_awq_clip_search(enabled: bool):
    """GPTQModel's AWQ processor sets ``apply_clip = True`` in its constructor, with no setting to change it: for
    the duration of one quantisation, processors are made with ``apply_clip = enabled``."""
    from gptqmodel.looper.awq_processor import AWQProcessor

    original = AWQProcessor.__init__

    def init(self, *a, **kw):
        original(self, *a, **kw)
        self.apply_clip = enabled

    AWQProcessor.__init__ = init
    try:
        yield
    finally:
        AWQProcessor.__init__ = original


@contextlib.contextmanager
def llmcompressor_cpu_pin_memory_patch():
    """llm-compressor 0.14's AWQ calls ``pin_memory()`` unconditionally, which fails without an accelerator.

    Pinning only speeds host-to-device copies; with no accelerator there is nothing to copy to, so for the
    duration of ``oneshot`` (and only when torch sees no accelerator) the cache's pinning becomes a no-op.
    """
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    has_accel = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    if has_accel:
        yield False
        return
    original = IntermediatesCache.__dict__["pin_memory"]
    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    try:
        yield True
    finally:
        IntermediatesCache.pin_memory = original


@contextlib.contextmanager
def transformers_patch_scan_guard():
    """transformers 5.17's ``apply_patches`` (used by llm-compressor's MoE loader) calls ``dir()`` on every
    ``transformers*`` module in ``sys.modules``; its lazy alias modules (e.g. ``image_processing_utils_fast``)
    then import their target, which fails without torchvision. Such unimportable aliases hold no model classes:
    they leave ``sys.modules`` while the loader runs and are put back afterwards."""
    hidden = {}
    for name, mod in list(sys.modules.items()):
        if name.startswith("transformers") and mod is not None and getattr(mod, "__file__", "") is None:
            try:
                dir(mod)
            except ImportError:
                hidden[name] = sys.modules.pop(name)
    try:
        yield sorted(hidden)
    finally:
        sys.modules.update(hidden)


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QuantkitError(f"--device {device} was given but torch sees no CUDA GPU (use --device cpu)")
    return device


def _strip_temp_paths(folder: Path) -> None:
    """Remove gptqmodel's random ``offload_to_disk_path`` from the saved configs (reproducible configs)."""
    for name in ("config.json", "quantize_config.json"):
        p = folder / name
        if not p.is_file():
            continue
        data = json.loads(p.read_text())
        qc = data.get("quantization_config", data) if name == "config.json" else data
        meta = qc.get("meta") if isinstance(qc, dict) else None
        if isinstance(meta, dict) and "offload_to_disk_path" in meta:
            meta.pop("offload_to_disk_path")
            p.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


# -- the engines --------------------------------------------------------------------------------

def _run_gptqmodel(method: str, src_path: Path, work: Path, texts: list[str], p: dict, device: str,
                   max_shard_size: str = MAX_SHARD_SIZE) -> dict:
    engine_env_defaults()
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.quantization import AWQConfig, GPTQConfig

    offload_dir = work / ".gptqmodel-offload"
    common = dict(bits=p["bits"], group_size=p["group_size"], offload_to_disk=True,
                  offload_to_disk_path=str(offload_dir))
    if method == "gptq":
        # --act-order as vLLM serves it: GPTQModel's group-aware reordering (act_group_aware), never desc_act
        # with grouped scales, which vLLM refuses (formats.VLLM_LIMITS)
        order = {"desc_act": False, "act_group_aware": bool(p["act_order"])}
        cfg = GPTQConfig(sym=p["sym"], damp_percent=p["damp"], **order, **common)
        kw = {}
    else:
        cfg = AWQConfig(sym=False, **common)
        kw = {"backend": BACKEND.AWQ_TORCH} if device == "cpu" else {}
    call = {"load": {"model": str(src_path), "quantize_config": type(cfg).__name__, "device": device,
                     **{k: v for k, v in common.items() if k != "offload_to_disk_path"},
                     **({**order, "sym": p["sym"], "damp_percent": p["damp"]}
                        if method == "gptq" else {"sym": False})},
            "quantize": {"calibration": f"{len(texts)} strings", "batch_size": 1,
                         **({"backend": "AWQ_TORCH"} if kw else {})},
            "save": {"max_shard_size": max_shard_size},
            **({"awq_processor": {"apply_clip": p["clip_search"]}} if method == "awq" else {})}
    clip = gptqmodel_awq_clip_search(p["clip_search"]) if method == "awq" else contextlib.nullcontext()
    with gptqmodel_logs_redirect(), clip:
        model = GPTQModel.load(str(src_path), cfg, device=device, **trust.hf_kwargs())
        model.quantize(texts, batch_size=1, **kw)
        model.save(str(work), max_shard_size=max_shard_size)
    del model
    shutil.rmtree(offload_dir, ignore_errors=True)
    _strip_temp_paths(work)
    return call


def _ct_modifiers(method: str, p: dict, ignore: tuple[str, ...] = (), awq_mappings: list | None = None):
    """llm-compressor's modifiers; ``lm_head`` and ``ignore`` (an MoE model's routers) stay unquantised;
    ``awq_mappings``: AWQ's smoothing pairs (None: llm-compressor's own for the architecture)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    group = p["group_size"]
    weights = dict(num_bits=p["bits"], type="int", symmetric=p["sym"],
                   strategy="group" if group > 0 else "channel", group_size=group if group > 0 else None)
    if method == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**weights))
        # actorder at modifier level: its default ("static") would otherwise override a None in the scheme
        return [GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head", *ignore], dampening_frac=p["damp"],
                             actorder="static" if p["act_order"] else None)]
    from llmcompressor.modifiers.awq import AWQModifier

    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**weights))
    return [AWQModifier(config_groups={"group_0": scheme}, ignore=["lm_head", *ignore], mappings=awq_mappings)]


def _run_llmcompressor(method: str, src_path: Path, work: Path, texts: list[str], p: dict, tokenizer,
                       offload: bool, moe_config: dict | None = None, max_shard_size: str = MAX_SHARD_SIZE) -> dict:
    """llm-compressor's ``oneshot`` and ``save_pretrained``. For an MoE model (``moe_config``: its config.json) the
    experts are loaded as 2-D Linears by llm-compressor's MoE loader under the checkpoint's own names
    (:mod:`quantkit.moe`), every expert is calibrated on every token, the tokens each saw are counted
    (``call["expert_tokens"]``) and transformers' conversion table is restored after saving."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    load_kw = {"dtype": "auto", **trust.hf_kwargs()}
    with contextlib.ExitStack() as stack:
        if moe_config:
            stack.enter_context(moe.conversion_mappings_restored())
        if offload:
            from compressed_tensors.offload import load_offloaded_model

            offload_dir = work / ".offload"
            with load_offloaded_model():
                model = AutoModelForCausalLM.from_pretrained(src_path, device_map="auto_offload",
                                                             offload_folder=str(offload_dir), **load_kw)
        elif moe_config:
            # llm-compressor's own MoE loader: experts load as 2-D Linears and the model keeps a save mapping, so
            # the saved names are the ones transformers' expert converters read back (a post-load linearisation
            # of Mixtral saves `experts.N.gate_proj.*`, which transformers 5 reports UNEXPECTED)
            from llmcompressor.modeling.moe.linearize import load_quantizable_moe

            with transformers_patch_scan_guard(), moe.checkpoint_names(moe_config), load_quantizable_moe():
                model = AutoModelForCausalLM.from_pretrained(src_path, **load_kw)
        else:
            model = AutoModelForCausalLM.from_pretrained(src_path, **load_kw)
        recipe = _ct_modifiers(method, p, tuple(moe.ignore_targets(moe_config)) if moe_config else (),
                               moe.awq_mappings(model, moe_config) if moe_config and method == "awq" else None)
        ds = Dataset.from_dict({"text": texts})
        counter = moe.ExpertTokenCounter(model) if moe_config else None
        with llmcompressor_cpu_pin_memory_patch() as patched:
            oneshot(model=model, tokenizer=tokenizer, dataset=ds, recipe=recipe, max_seq_length=p["seq_len"],
                    num_calibration_samples=len(texts), shuffle_calibration_samples=False,
                    trust_remote_code_model=trust.consented(),
                    moe_calibrate_all_experts=bool(moe_config))
        if counter is not None:
            counter.close()
        model.save_pretrained(str(work), save_compressed=True, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(str(work))
    shutil.rmtree(work / ".offload", ignore_errors=True)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    call = {"load": {"model": str(src_path), "dtype": "auto", "device_map": "auto_offload" if offload else None},
            "oneshot": {"recipe": "recipe.yaml", "max_seq_length": p["seq_len"],
                        "num_calibration_samples": len(texts), "shuffle_calibration_samples": False,
                        "moe_calibrate_all_experts": bool(moe_config),
                        "dataset": f"{len(texts)} texts (column text)"},
            "save_pretrained": {"save_compressed": True, "max_shard_size": max_shard_size},
            "cpu_pin_memory_patch": patched}
    if counter is not None:
        call["expert_tokens"] = counter.per_layer()
    return call


# -- folders ------------------------------------------------------------------------------------

def _folder_files(folder: Path) -> list[Path]:
    from quantkit.manifest import MANIFEST_NAME

    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _cached(folder: Path, name: str, params: dict, base_sha: str):
    """The existing Manifest when ``folder`` already holds this exact, intact variant; else None.

    Raises when the folder holds something else (another model, other parameters, not ours)."""
    from quantkit.manifest import Manifest

    if not folder.exists():
        return None
    if not folder.is_dir():
        raise QuantkitError(f"{folder} is a file; choose another --out")
    if not Manifest.exists(folder):
        if any(folder.iterdir()):
            raise QuantkitError(f"{folder} exists and is not a quantkit output folder; choose another --out "
                                "or delete it")
        return None
    m = Manifest.load(folder)
    rec = m.artifact(name)
    if m.base.get("sha") and m.base.get("sha") != base_sha:
        raise QuantkitError(f"{folder} holds {name} of {m.base.get('id') or m.base.get('local_path')} at "
                            f"{m.base['sha'][:12]}, not {base_sha[:12]}: delete it or choose another --out")
    if rec is None:
        if m.artifacts:
            raise QuantkitError(f"{folder} holds {', '.join(m.artifacts)}, not {name}; choose another --out")
        return None
    if rec.get("params") != params:
        diff = sorted(k for k in set(rec.get("params", {})) | set(params)
                      if rec.get("params", {}).get(k) != params.get(k))
        raise QuantkitError(f"{folder} holds {name} made with other parameters ({', '.join(diff)}); delete it "
                            "or choose another --out")
    if not m.artifact_is_intact(name):
        return None  # damaged or incomplete: rebuild
    return m


def _copy_license_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for pattern in LICENSE_GLOBS:
        for p in src.glob(pattern):
            if p.is_file() and not (dst / p.name).exists():
                shutil.copy2(p, dst / p.name)
                copied.append(p.name)
    return copied


def _stage(i: int, n: int, text: str) -> None:
    print(f"[{i}/{n}] {text}", file=sys.stderr, flush=True)


def run(method: str, model: str | ModelSource, *, fmt: str = DEFAULT_FORMAT, bits: int = 4, group_size: int = 128,
        sym: bool = True, act_order: bool = True, damp: float = 0.01, calibration: str | None = None,
        samples: int = 128, seq_len: int = 2048, out: str | os.PathLike | None = None,
        revision: str | None = None, allow_pickle: bool = False, device: str = "auto",
        offload: bool = False, verify: bool = True, max_shard_size: str = MAX_SHARD_SIZE,
        adapter: str | None = None, adapter_revision: str | None = None, engine: str = "auto") -> QuantResult:
    """Quantise MODEL with ``method`` (awq|gptq) into one variant folder; see quantize_awq/quantize_gptq. The
    weights are saved in safetensors shards of at most ``max_shard_size`` (transformers' spelling); the folder is
    then verified against the base (:mod:`quantkit.verify`; ``verify=False`` records it as skipped). With
    ``adapter`` (a PEFT LoRA) the merged fine-tune is quantised (:func:`quantkit.lora.resolve_source`).
    ``engine``: where the folder is checked (:func:`quantkit.engines.choose`; auto: vLLM where it can run
    the scheme here)."""
    from quantkit.calibration import parse_spec
    from quantkit.lora import resolve_source
    from quantkit.util import sha256_file

    m = HF_METHODS[method]  # what the method does not let a user choose comes from its row
    sym = sym if "sym" in m.options else m.sym
    act_order = act_order if "act_order" in m.options else m.act_order
    damp_v = damp if "damp" in m.options else m.damp
    check_params(method, bits=bits, group_size=group_size, fmt=fmt, samples=samples, seq_len=seq_len,
                 damp=damp_v)
    spec = parse_spec(calibration)  # fail on a malformed SPEC before any download
    _check_group_size_from_headers(model, revision, group_size)
    n = 7
    _stage(1, n, f"resolving {model if isinstance(model, str) else model.name}")
    src = resolve_source(model, revision, allow_pickle=allow_pickle, adapter=adapter,
                         adapter_revision=adapter_revision)
    check_architecture(src.config, method, fmt)
    moe_info = moe_settings(src.config)
    if moe_info and fmt == "compressed-tensors" and not sym:  # AWQ: transformers cannot load asymmetric experts
        print(f"note: {MOE_CT_SYMMETRIC}", file=sys.stderr)
        sym = True
    name = variant_name(src.name, method, fmt, bits, group_size, sym)
    folder = Path(out).expanduser() if out else Path.cwd() / name
    folder = folder.absolute()
    params = {"method": method, "format": fmt, "bits": bits, "group_size": group_size, "sym": sym,
              "calibration": spec.source, "samples": samples, "seq_len": seq_len}
    params.update({k: v for k, v in (("act_order", act_order), ("damp", damp)) if k in m.options})
    if method == "awq" and fmt == "classic":
        params["clip_search"] = AWQ_CLIP_SEARCH
    if spec.path is not None:
        params["calibration_file_sha256"] = sha256_file(spec.path)
    if src.trust_remote_code:  # made with the model's own code: not the same folder as one made without it
        params["trust_remote_code"] = True
    # one process builds a folder at a time; another one waits, then finds it cached
    with file_lock(folder_lock_file(folder), what=f"{folder.name} is being built by another process"):
        return _build(method, src, name, folder, params, spec, n, fmt=fmt, bits=bits, group_size=group_size,
                      calibration=calibration, samples=samples, seq_len=seq_len, device=device, offload=offload,
                      max_shard_size=max_shard_size, moe_info=moe_info, verify=verify, verify_engine=engine)


def _build(method: str, src, name: str, folder: Path, params: dict, spec, n: int, *, fmt: str, bits: int,
           group_size: int, calibration, samples: int, seq_len: int, device: str, offload: bool,
           max_shard_size: str, moe_info: dict, verify: bool, verify_engine: str = "auto") -> QuantResult:
    from quantkit.calibration import load_calibration
    from quantkit.manifest import Manifest, file_record

    cached = _cached(folder, name, params, src.sha)
    if cached is not None:
        _stage(n, n, f"{folder} already holds {name} (intact): nothing to do")
        _verify(cached, name, src, bits, verify, verify_engine)
        return QuantResult(folder=folder, name=name, manifest=cached, cached=True)

    stats = weight_stats(src.path)
    check_group_size(stats, group_size, src.name)
    needs = resource_needs(stats, method=method, fmt=fmt, bits=bits, group_size=group_size, offload=offload)
    folder.parent.mkdir(parents=True, exist_ok=True)
    check_resources(needs, free_disk=shutil.disk_usage(folder.parent).free,
                    available_memory=_available_memory(), where=folder.parent)

    _stage(2, n, f"calibration {spec.source}: {samples} x {seq_len} tokens requested")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src.path, **trust.hf_kwargs())
    cal = load_calibration(calibration, tokenizer=tokenizer, samples=samples, seq_len=seq_len)
    device_used = pick_device(device)
    engine = "gptqmodel" if fmt == "classic" else "llmcompressor"
    _stage(3, n, f"{method.upper()} {bits}-bit g{group_size} with {engine} on {device_used} "
                 f"({cal.samples} samples, {cal.token_count} tokens; the engine reports per layer)")

    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(work, 0o777 & ~umask)  # mkdtemp makes it private; the published folder gets the usual mode
    try:
        engine_env_defaults()
        threads = torch_threads()
        with Timer() as t, stdout_to_stderr():
            if fmt == "classic":
                call = _run_gptqmodel(method, src.path, work, cal.texts, params, device_used, max_shard_size)
            else:
                call = _run_llmcompressor(method, src.path, work, cal.texts, params, tokenizer, offload,
                                          moe_config=src.config if moe_info else None, max_shard_size=max_shard_size)
        expert_names = moe.check_expert_names(work, src.config) if moe_info else None
        expert_tokens = call.pop("expert_tokens", None)
        _stage(4, n, f"quantised in {t.seconds:.1f} s; writing recipe, licence and manifest")
        copied = _copy_license_files(src.path, work)
        recipe = {"method": method, "format": fmt, "engine": engine, "params": params,
                  "calibration": cal.as_dict(), "device": device_used, "offload": offload,
                  "engine_call": call, "tools": versions(*HF_FORMATS[fmt].dists), "threads": threads,
                  "reproducible": REPRODUCIBLE,
                  **({"moe": moe_info} if moe_info else {})}
        (work / RECIPE_NAME).write_text(json.dumps(recipe, indent=2, default=str) + "\n")
        _stage(5, n, "hashing files")
        files = [file_record(work, p) for p in _folder_files(work)]
        size = sum(f["size"] for f in files if f["path"].endswith(".safetensors"))
        manifest = Manifest(work)
        manifest.set_base(**src.manifest_base())
        qc = json.loads((work / "config.json").read_text()).get("quantization_config", {})
        manifest.set_artifact(name, {
            "path": ".",
            "format": method if fmt == "classic" else "compressed-tensors",
            "method": method,
            "type": f"INT{bits}" if fmt == "classic" else f"W{bits}A16",
            "bits": bits,
            "bits_per_weight": round(size * 8 / stats["params"], 3) if stats["params"] else None,
            "group_size": group_size,
            "quant_method": qc.get("quant_method"),
            "engine": engine,
            "files": files,
            "size": size,
            "params": params,
            "calibration": cal.as_dict(),
            **({"moe": {**expert_token_counts(moe_info, expert_tokens or {}), "vllm_names": expert_names}}
               if moe_info else {}),
            "tools": recipe["tools"],
            "device": device_used,
            "seconds": round(t.seconds, 2),
            "created": now_iso(),
            "licence_files": copied,
        })
        manifest.log(method, artifact=name, format=fmt, seconds=round(t.seconds, 2))
        manifest.save()
        _stage(6, n, f"publishing {folder}")
        old = None
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".old", dir=folder.parent))
            os.replace(folder, old / "x")
        os.replace(work, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    manifest = Manifest.load(folder)
    _verify(manifest, name, src, bits, verify, verify_engine)
    return QuantResult(folder=folder, name=name, manifest=manifest, cached=False)


def _verify(manifest, name: str, src, bits: int, enabled: bool, engine: str = "auto") -> None:
    """Check the finished (or re-used) folder in its engine against the base; exit 1 when it fails."""
    if enabled and not (manifest.artifact(name).get("verify") or {}).get("passed"):
        _stage(7, 7, f"verifying {name} in its engine against the base")
    with stdout_to_stderr():
        res = verify_recorded(manifest, name, src.path, bits=bits, enabled=enabled, base_sha=src.sha,
                              engine=engine)
    raise_if_failed({name: res}, manifest.folder)
