"""Output folders as quantkit's engines write them, built directly (card/push tests must not wait for the engines).

* :func:`make_gguf_set`: real (small) GGUF files written with ``gguf.GGUFWriter`` -- Llama metadata, real tensors --
  one per type, plus the intermediates an engine leaves (an F16 GGUF and a log under ``.quantkit-work/``, the
  imatrix), and a ``quantkit.json`` following ``quantkit/manifest.py``'s schema.
* :func:`make_awq_folder`: an AWQ-style HF folder (config.json with ``quantization_config`` {quant_method: awq,
  bits: 4, group_size: 128}, safetensors, tokenizer) + ``quantkit.json`` with one artifact for the folder.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from quantkit.manifest import Manifest, file_record

BASE_SHA = "0123456789abcdef0123456789abcdef01234567"
#: what quantkit.verify records for an artifact that passed its check (engines verify every build)
VERIFY_PASSED = {"passed": True, "engine": "test", "tokens": 255, "kld": 0.01, "top1": 0.95, "bits": 4,
                 "bound": 0.5, "seconds": 1.0, "error": None, "skipped": False}
LAYERS, HEADS, KV_HEADS, HIDDEN = 2, 4, 2, 64


def _base_folder(folder: Path, license: str | None, extra_meta: str = "") -> Path:
    """A pulled-base look-alike (config + card + licence files) the manifest's base.local_path points to."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS}))
    lic = f"license: {license}\n" if license else ""
    (folder / "README.md").write_text(f"---\n{lic}{extra_meta}language:\n- en\npipeline_tag: text-generation\n"
                                      "---\n# Base\n")
    (folder / "LICENSE").write_text(f"{license or 'no'} licence text (test copy)\n")
    if license and license.startswith("llama"):
        (folder / "USE_POLICY.md").write_text("Acceptable use policy (test copy)\n")
    return folder


def _write_gguf(path: Path, name: str, ftype: int, seed: int, n_tensors: int = 3, width: int = 2048) -> None:
    from gguf import GGUFWriter

    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_block_count(LAYERS)
    w.add_context_length(2048)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(4 * HIDDEN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_file_type(ftype)
    for i in range(n_tensors):
        w.add_tensor(f"blk.{i}.attn_q.weight", rng.standard_normal((16, width // 16)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def make_gguf_set(out: Path, *, model_name: str = "TinyLlama-Chat", base_id: str = "acme/TinyLlama-Chat",
                  license: str | None = "apache-2.0", types=("Q8_0", "Q4_K_M"), evaluated: bool = False,
                  license_meta: str = "", verified: bool = True) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    base = _base_folder(out.parent / f"{out.name}-base", license, license_meta)
    m = Manifest(out)
    m.set_base(id=base_id, revision="main", sha=BASE_SHA, license=license, model_name=model_name,
               architecture="LlamaForCausalLM", model_type="llama", local_path=str(base),
               pipeline_tag="text-generation")
    work = out / ".quantkit-work"
    work.mkdir(exist_ok=True)
    f16 = work / f"{model_name}-F16.gguf"
    _write_gguf(f16, model_name, 1, seed=1, width=4096)
    (work / "convert.log").write_text("converter log\n")
    imx = out / f"{model_name}.imatrix"
    imx.write_bytes(b"GGUF-imatrix-test" + bytes(range(256)) * 8)
    m.data["intermediates"] = {
        "convert": {"path": f16.relative_to(out).as_posix(), "sha256": hashlib.sha256(f16.read_bytes()).hexdigest()},
        "imatrix": {"path": imx.name, "sha256": hashlib.sha256(imx.read_bytes()).hexdigest(), "method": "torch"},
    }
    bpw = {"Q8_0": 8.5, "Q6_K": 6.56, "Q5_K_M": 5.69, "Q4_K_M": 4.89, "Q3_K_M": 3.91, "Q2_K": 3.35, "F16": 16.0}
    ftypes = {"Q8_0": 7, "Q6_K": 18, "Q5_K_M": 17, "Q4_K_M": 15, "Q3_K_M": 12, "Q2_K": 10, "F16": 1}
    calibration = {"source": "builtin:calibration", "sha256": "ab" * 32, "tokens": 4096}
    for i, t in enumerate(types):
        name = f"{model_name}-{t}.gguf"
        p = out / name
        _write_gguf(p, model_name, ftypes.get(t, 15), seed=10 + i, width=int(512 * bpw.get(t, 4)))
        rec = {
            "path": name, "format": "gguf", "method": "gguf", "type": t, "bits_per_weight": bpw.get(t),
            "files": [file_record(out, p)],
            "params": {"type": t, "ftype": ftypes.get(t), "outtype": "f16",
                       "imatrix": {"name": imx.name, "sha256": m.data["intermediates"]["imatrix"]["sha256"]}},
            "calibration": calibration,
            "tools": {"quantkit": "0.1.0", "llama-cpp-python": "0.3.36", "gguf": "0.19.0"},
            "seconds": 1.5,
        }
        if verified:
            rec["verify"] = dict(VERIFY_PASSED)
        rec["size"] = sum(f["size"] for f in rec["files"])
        if evaluated:
            ppl = 12.0 * (1 + 0.01 * (i + 1))
            rec["eval"] = {"ppl": ppl, "base_ppl": 12.0, "ppl_ratio": ppl / 12.0, "delta_ppl": ppl - 12.0,
                           "kld_mean": 0.001 * (i + 1), "kld_p99": 0.01 * (i + 1), "top1": 0.99 - 0.01 * i,
                           "tokens": 2048, "ctx": 512, "text": "builtin:eval", "text_sha256": "cd" * 32}
            rec["bench"] = {"pp_tps": 900.0 - 50 * i, "tg_tps": 80.0 + 10 * i, "peak_memory": 200_000_000 + i}
        m.set_artifact(name, rec)
    if evaluated:
        m.data["evaluation"] = {"text": "builtin:eval", "text_sha256": "cd" * 32, "ctx": 512, "tokens": 2048,
                                "base_ppl": 12.0, "hardware": {"cpu": "Test CPU", "threads": 2}}
    m.log("gguf.quantize", types=list(types))
    m.save()
    return out


def make_awq_folder(out: Path, *, model_name: str = "TinyLlama-Chat", base_id: str = "acme/TinyLlama-Chat",
                    license: str | None = "apache-2.0", verified: bool = True) -> Path:
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    base = _base_folder(out.parent / f"{out.name}-base", license)
    rng = np.random.default_rng(7)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
           "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
           "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True,
                                   "version": "gemm"}}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text('{"do_sample": false}')
    (out / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}}')
    (out / "tokenizer_config.json").write_text('{"model_max_length": 2048}')
    save_file({"model.layers.0.self_attn.q_proj.qweight": rng.integers(0, 2**31, (64, 8), dtype=np.int32),
               "model.layers.0.self_attn.q_proj.scales": rng.standard_normal((1, 64)).astype(np.float16),
               "model.embed_tokens.weight": rng.standard_normal((256, HIDDEN)).astype(np.float16)},
              str(out / "model.safetensors"))
    (out / ".quantkit-work").mkdir(exist_ok=True)
    (out / ".quantkit-work" / "calib-cache.bin").write_bytes(b"x" * 1000)
    m = Manifest(out)
    m.set_base(id=base_id, revision="main", sha=BASE_SHA, license=license, model_name=model_name,
               architecture="LlamaForCausalLM", model_type="llama", local_path=str(base),
               pipeline_tag="text-generation")
    files = [file_record(out, out / n) for n in ("config.json", "generation_config.json", "model.safetensors",
                                                 "tokenizer.json", "tokenizer_config.json")]
    rec = {"path": ".", "format": "awq", "method": "awq", "type": "W4A16", "bits": 4, "group_size": 128,
           "files": files, "size": sum(f["size"] for f in files),
           "params": {"bits": 4, "group_size": 128, "sym": False, "engine": "gptqmodel", "backend": "AWQ_TORCH"},
           "calibration": {"source": "builtin:calibration", "samples": 64, "max_seq_len": 512, "sha256": "ef" * 32},
           "tools": {"quantkit": "0.1.0", "gptqmodel": "7.6.0", "torch": "2.13.0", "transformers": "5.17.0"},
           "seconds": 12.0}
    if verified:
        rec["verify"] = dict(VERIFY_PASSED)
    m.set_artifact("awq-w4g128", rec)
    m.log("awq", bits=4)
    m.save()
    return out


def tree_files(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under folder (hidden ones included)."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}
