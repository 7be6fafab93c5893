"""Routed-expert (MoE) models in the GPU formats (issue 21): which layers and experts a config has, how
llm-compressor must load a checkpoint so that the saved experts carry the names transformers and vLLM read
(``formats.MOE_LAYOUTS``), the check of those names in the saved safetensors headers, and the calibration
tokens each expert measurably saw.

Measured with llm-compressor 0.14.0.1 / transformers 5.17 (tests/test_arch_matrix.py):

* llm-compressor's ``load_quantizable_moe`` loads Qwen2/3-MoE and DeepSeek-V3 through its own 2-D load
  mapping; Mixtral has none, so its experts are linearised after loading and saved as
  ``block_sparse_moe.experts.E.gate_proj`` (transformers' Mixtral converter reads only ``w1/w3/w2``: every expert
  UNEXPECTED). A renaming w1/w3/w2 <-> gate/up/down registered with llm-compressor's ``patch_moe_mappings``
  (:func:`checkpoint_names`) makes it load the checkpoint's experts as 2-D and save them under their own names.
* DeepSeek-V2 has no registered experts module in llm-compressor (``patch_moe_mappings`` refuses it); its
  post-load linearisation saves ``mlp.experts.E.gate_proj``, which is DeepSeek-V2's own layout.
* ``load_quantizable_moe`` overwrites transformers' process-wide conversion mapping of the architecture with its
  2-D one, so a later load of the *base* in the same process leaves its experts random (UNEXPECTED):
  :func:`conversion_mappings_restored` puts the table back once the variant is saved.
"""

from __future__ import annotations

import contextlib
import re
import sys
from pathlib import Path

from quantkit.errors import QuantkitError
from quantkit.formats import MOE_LAYOUTS, MoELayout
from quantkit.util import safetensors_tensors

# Config keys that hold the number of routed experts (Mixtral, Qwen2/3-MoE, DeepSeek-V2/V3).
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
#: compressed-tensors' packed-weight tensors of one quantised Linear (pack-quantized)
PACKED = ("weight_packed", "weight_scale")


def text_config(config: dict) -> dict:
    return config.get("text_config") or config


def model_type(config: dict) -> str | None:
    return text_config(config).get("model_type") or config.get("model_type")


def moe_experts(config: dict) -> int:
    """Number of routed experts per MoE layer (0 for a dense model)."""
    cfg = text_config(config)
    return max([int(cfg.get(k) or 0) for k in EXPERT_KEYS] + [0])


def moe_layers(config: dict) -> list[int]:
    """Indices of the decoder layers that hold routed experts (DeepSeek's first_k_dense_replace, Qwen's
    mlp_only_layers / decoder_sparse_step)."""
    cfg = text_config(config)
    n = int(cfg.get("num_hidden_layers") or 0)
    dense = set(cfg.get("mlp_only_layers") or [])
    first = int(cfg.get("first_k_dense_replace") or 0)
    step = int(cfg.get("decoder_sparse_step") or cfg.get("moe_layer_freq") or 1)
    return [i for i in range(n) if i not in dense and i >= first and (i + 1) % step == 0]


def layout(config: dict) -> MoELayout | None:
    return MOE_LAYOUTS.get(model_type(config))


# -- loading for calibration ----------------------------------------------------------------------

@contextlib.contextmanager
def checkpoint_names(config: dict):
    """While llm-compressor's MoE loader runs: where the checkpoint's expert names differ from its 2-D modules'
    (Mixtral's w1/w3/w2), register the renaming with llm-compressor (``patch_moe_mappings``), dropping the
    architecture's fused 3-D converters, so the experts load as 2-D and are saved back under the checkpoint's
    names. Nothing to do for the other layouts."""
    lay = layout(config)
    if lay is None or lay.projs == lay.module_projs:
        yield None
        return
    from llmcompressor.modeling.moe.conversion_mappings import patch_moe_mappings
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    renames = [WeightRenaming(source_patterns=rf"\.experts\.(\d+)\.{ckpt}\.", target_patterns=rf".experts.\1.{mod}.")
               for ckpt, mod in zip(lay.projs, lay.module_projs)]
    fused = [t for c in get_checkpoint_conversion_mapping(lay.model_type) or []
             if isinstance(c, WeightConverter) for t in c.target_patterns if ".experts." in t]
    with patch_moe_mappings(lay.model_type, renames, remove_targets=fused) as patch:
        yield patch


@contextlib.contextmanager
def conversion_mappings_restored():
    """Put transformers' process-wide checkpoint conversion table back as it was (llm-compressor's MoE loader
    overwrites the architecture's entry with its 2-D mapping and leaves it there)."""
    from transformers import conversion_mapping as cm

    cm.get_checkpoint_conversion_mapping("llama")  # builds the table
    saved = dict(cm._checkpoint_conversion_mapping_cache)
    try:
        yield
    finally:
        cm._checkpoint_conversion_mapping_cache.clear()
        cm._checkpoint_conversion_mapping_cache.update(saved)


def ignore_targets(config: dict) -> list[str]:
    """llm-compressor ``ignore`` entries that keep the router and the layout's other unquantised modules (Qwen2-MoE's
    ``shared_expert_gate``, an ``nn.Linear`` that a ``Linear`` target would quantise: measured) 16-bit."""
    lay = layout(config)
    if lay is None:
        return []
    return [rf"re:.*\.{m}$" for m in (lay.router, *lay.unquantised)]


_MLP_NORM = "post_attention_layernorm"


def awq_mappings(model, config: dict) -> list:
    """AWQ's smoothing pairs for an MoE model: llm-compressor's own for the architecture, with the pair that smooths
    the norm in front of the MoE block replaced. Smoothing divides that norm's output by per-channel scales and
    multiplies them back into the layers listed with it, so every module that reads the norm's output must be
    listed: the router, each expert's gate/up, the shared expert(s) and their gate. llm-compressor's pair lists
    some of them (Mixtral: experts only; Qwen2-MoE: no shared expert; DeepSeek-V3: the router, which a leading
    dense layer lacks: "AWQ needs to match a single smoothlayer", measured), so the router's or shared expert's
    input would shift uncompensated. Where every decoder layer is an MoE layer the pair lists all readers;
    where some are dense (DeepSeek's first_k_dense_replace) that norm is not smoothed at all."""
    from llmcompressor.modifiers.transform.awq.dynamic_mappings import get_layer_mappings_from_model
    from llmcompressor.modifiers.transform.awq.mappings import AWQMapping

    lay = layout(config)
    kept = [m for m in get_layer_mappings_from_model(model) if not m.smooth_layer.endswith(f"{_MLP_NORM}$")]
    n_layers = int(text_config(config).get("num_hidden_layers") or 0)
    if lay is None or moe_layers(config) != list(range(n_layers)):
        return kept
    readers = [rf"re:.*\.{lay.router}$", *(rf"re:.*\.experts\.\d+\.{p}$" for p in lay.module_projs[:2])]
    if lay.shared:
        readers += [rf"re:.*\.{lay.shared}\.{p}$" for p in lay.module_projs[:2]]
    readers += [rf"re:.*\.{m}$" for m in lay.unquantised]
    return [*kept, AWQMapping(f"re:.*{_MLP_NORM}$", readers)]


# -- calibration tokens per expert ----------------------------------------------------------------

class ExpertTokenCounter:
    """Counts, during llm-compressor's calibration passes (not its propagation passes, which run with its hooks
    disabled), the tokens each expert's first projection was fed and the tokens the router sent to it (top-k),
    per MoE layer, with forward pre-hooks on llm-compressor's 2-D experts modules."""

    def __init__(self, model):
        from llmcompressor.modeling.moe.linearize import get_linearized_moes
        from llmcompressor.modifiers.utils.hooks import HooksMixin

        self._hooks_off = lambda: HooksMixin._HOOKS_DISABLED
        self.fed: dict[int, list[int]] = {}
        self.routed: dict[int, list[int]] = {}
        self._handles = []
        for name, experts in get_linearized_moes(model):
            m = re.search(r"layers\.(\d+)\.", name)
            if not m:
                continue
            layer, n = int(m.group(1)), experts.num_experts
            self.fed[layer], self.routed[layer] = [0] * n, [0] * n
            self._handles.append(experts.register_forward_pre_hook(self._router_hook(layer, n)))
            for e in range(n):
                first = getattr(experts[e], "gate_proj", None) or experts[e].up_proj
                self._handles.append(first.register_forward_pre_hook(self._fed_hook(layer, e)))

    def _router_hook(self, layer: int, n: int):
        def hook(_module, args):
            if not self._hooks_off() and len(args) >= 2:
                import torch

                counts = torch.bincount(args[1].reshape(-1).long().cpu(), minlength=n).tolist()
                self.routed[layer] = [a + b for a, b in zip(self.routed[layer], counts)]
        return hook

    def _fed_hook(self, layer: int, e: int):
        def hook(_module, args):
            if not self._hooks_off():
                x = args[0]
                self.fed[layer][e] += int(x.numel() // x.shape[-1])
        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def per_layer(self) -> dict[str, dict]:
        """``{layer: {"min", "max", "routed_min", "routed_max"}}`` (fed tokens, and router top-k picks)."""
        return {str(i): {"min": min(self.fed[i]), "max": max(self.fed[i]),
                         "routed_min": min(self.routed[i]), "routed_max": max(self.routed[i])}
                for i in sorted(self.fed)}


def expert_token_record(moe: dict, per_layer: dict[str, dict]) -> dict:
    """quantkit.json ``moe``: the settings plus the measured tokens per MoE layer; warns about a layer where an
    expert was fed none (a layer measured nothing is reported as missing)."""
    missing = [str(i) for i in moe["layers"] if str(i) not in per_layer]
    starved = [i for i, c in per_layer.items() if c["min"] == 0]
    if starved:
        print(f"warning: an expert got no calibration tokens in layer(s) {', '.join(starved)}", file=sys.stderr)
    return {**moe, "expert_tokens": per_layer, "starved_layers": starved, "unmeasured_layers": missing}


# -- the saved names ------------------------------------------------------------------------------

def _prefix(names: set[str]) -> str:
    for n in sorted(names):
        m = re.match(r"(.*?)layers\.\d+\.", n)
        if m:
            return m.group(1)
    return "model."


def expert_name_problems(names: set[str], config: dict) -> list[str]:
    """What in a compressed-tensors checkpoint's tensor names (``names``) vLLM's loader for the architecture
    would not read as ``formats.MOE_LAYOUTS`` says: fused experts, a missing or misnamed expert tensor, a
    quantised router, embedding or head. Empty when it is all as vLLM expects."""
    lay = layout(config)
    if lay is None:
        return [f"no MoE layout is known for {model_type(config)}"]
    pre, experts, layers = _prefix(names), moe_experts(config), moe_layers(config)
    want = " / ".join(lay.projs)
    out = []
    fused = sorted(n for n in names if re.search(r"\.experts\.(?!\d+\.)[a-z_0-9]*(proj|w\d+)", n))
    if fused:
        out.append(f"fused experts {fused[0]} (one tensor for all experts; vLLM's loader reads one tensor set "
                   f"per expert, {pre}layers.L.{lay.block}.experts.E.{{{want}}}.*)")
    pat = re.compile(r"layers\.(\d+)\.(.+)\.experts\.(\d+)\.([^.]+)\.")
    for n in sorted(names):
        m = pat.search(n)
        if m and (m.group(2) != lay.block or m.group(4) not in lay.projs):
            out.append(f"expert tensor {n} is not a name vLLM reads for {lay.model_type} "
                       f"({pre}layers.L.{lay.block}.experts.E.{{{want}}}.*, {lay.source})")
            break
    for layer in layers:
        block = f"{pre}layers.{layer}.{lay.block}."
        absent = next((f"{block}experts.{e}.{proj}.{part}" for e in range(experts) for proj in lay.projs
                       for part in PACKED if f"{block}experts.{e}.{proj}.{part}" not in names), None)
        if absent:
            out.append(f"{absent} is missing (every expert quantised, as vLLM's {lay.source.split(':')[0]} "
                       "loads them)")
        for mod in (lay.router, *lay.unquantised):
            if any(f"{block}{mod}.{p}" in names for p in PACKED):
                out.append(f"{block}{mod} is quantised (vLLM loads the router unquantised; a quantised one "
                           "routes wrong)")
            elif mod == lay.router and f"{block}{mod}.weight" not in names:
                out.append(f"{block}{mod}.weight (the router) is missing")
    for n in sorted(names):
        if ("embed_tokens." in n or n.startswith("lm_head.")) and n.endswith(PACKED):
            out.append(f"{n}: the embedding / output head is quantised (quantkit keeps it 16-bit)")
            break
    return out


def check_expert_names(folder: Path, config: dict) -> dict:
    """After saving: the checkpoint's expert, router and embedding tensors as vLLM's loader expects them
    (:func:`expert_name_problems`), or a one-line QuantkitError. Returns what was checked (quantkit.json)."""
    names = {n for n, *_ in safetensors_tensors(folder)}
    problems = expert_name_problems(names, config)
    lay = layout(config)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise QuantkitError(f"the saved {model_type(config)} checkpoint does not carry the expert names vLLM reads: "
                            f"{problems[0]}{more}; nothing was published")
    n = len(moe_layers(config)) * moe_experts(config) * len(lay.projs)
    return {"passed": True, "expert_tensors": n, "names": f"layers.L.{lay.block}.experts.E.{{{','.join(lay.projs)}}}",
            "router": f"{lay.block}.{lay.router} unquantised", "vllm_source": lay.source}
