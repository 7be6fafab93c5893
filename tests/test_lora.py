"""LoRA fine-tunes: merge then quantise, and the adapter beside a quantised base (issue 13).

A real PEFT LoRA adapter is built on the tiny Llama (lora_B set to random non-zero values, so the fine-tune's
outputs differ visibly from the base's); the same on SmolLM2 in the slow test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fixtures_models as fm
import numpy as np
import pytest
from test_gguf import SENTENCE, gguf_logits, hf_logits, mean_kl, rel_err

LORA_VERSION = "2"


def build_lora(base: Path, name: str, seed: int = 0, r: int = 8) -> Path:
    """A LoRA adapter (q/k/v/o + MLP) with non-zero lora_B, cached under the test cache."""
    final = fm.TEST_CACHE / f"lora-{name}-r{r}-s{seed}-v{LORA_VERSION}"
    if (final / "adapter_config.json").is_file():
        return final
    import tempfile

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, task_type="CAUSAL_LM",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.05)
    tmp = Path(tempfile.mkdtemp(prefix=f".lora-{name}-", dir=fm.TEST_CACHE))
    model.save_pretrained(tmp, safe_serialization=True)
    return fm._publish_dir(tmp, final)


@pytest.fixture(scope="session")
def tiny_lora(tiny_llama) -> Path:
    return build_lora(tiny_llama, "tiny-llama")


@pytest.fixture(scope="session")
def merged(tiny_llama, tiny_lora):
    from quantkit.lora import resolve_source

    return resolve_source(str(tiny_llama), adapter=str(tiny_lora))


def peft_logits(base: Path, adapter: Path, ids: list[int]) -> np.ndarray:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0].float().numpy()


def _ids(folder: Path) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)(SENTENCE).input_ids


# -- bad input: one line, before any heavy work ---------------------------------------------------

def _adapter_copy(src: Path, dest: Path, **config) -> Path:
    shutil.copytree(src, dest)
    cfg = json.loads((dest / "adapter_config.json").read_text())
    cfg.update(config)
    (dest / "adapter_config.json").write_text(json.dumps(cfg))
    return dest


def _retensor(folder: Path, fn) -> None:
    from safetensors.torch import load_file, save_file

    p = folder / "adapter_model.safetensors"
    save_file(fn(load_file(p)), p)


def test_bad_adapters_fail_in_one_line(tiny_llama, tiny_lora, tmp_path, run_cli):
    import torch

    no_cfg = tmp_path / "no-config"
    shutil.copytree(tiny_lora, no_cfg)
    (no_cfg / "adapter_config.json").unlink()
    ia3 = _adapter_copy(tiny_lora, tmp_path / "ia3", peft_type="IA3")
    other_arch = _adapter_copy(tiny_lora, tmp_path / "arch")
    _retensor(other_arch, lambda t: {k.replace("layers.1.", "layers.7."): v for k, v in t.items()})
    other_size = _adapter_copy(tiny_lora, tmp_path / "size")
    _retensor(other_size, lambda t: {k: torch.zeros(v.shape[0], 128) if "q_proj.lora_A" in k else v
                                     for k, v in t.items()})
    cases = [(no_cfg, "has no adapter_config.json"), (ia3, "IA3 adapter"),
             (other_arch, "which the base does not have"), (other_size, "different hidden sizes")]
    for adapter, msg in cases:
        out = tmp_path / f"out-{adapter.name}"
        code, _, err = run_cli("gguf", tiny_llama, "--types", "Q8_0", "--adapter", adapter, "--out", out)
        assert code != 0, adapter
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        assert len(lines) == 1 and msg in lines[0], err
        assert "Traceback" not in err and not out.exists()
    code, _, err = run_cli("lora", other_size, "--base", tiny_llama, "--out", tmp_path / "l")
    assert code != 0 and "different hidden sizes" in err and not (tmp_path / "l").exists()


# -- merge ------------------------------------------------------------------------------------------

def test_merge_equals_peft_and_changes_the_model(tiny_llama, tiny_lora, merged):
    ids = _ids(tiny_llama)
    base = hf_logits(tiny_llama, ids)
    ref = peft_logits(tiny_llama, tiny_lora, ids)
    got = hf_logits(merged.path, ids)
    assert rel_err(got, ref) < 1e-5
    assert mean_kl(ref, base) > 0.05  # the adapter changes the outputs visibly
    rec = merged.manifest_base()
    assert rec["adapter"]["rank"] == 8 and rec["adapter"]["sha"].startswith("local-")
    assert "q_proj" in rec["adapter"]["target_modules"] and rec["merged_from"]["sha"].startswith("local-")
    assert rec["sha"].startswith("merged-") and rec["local_path"] == str(merged.path)
    assert rec["license"] == "unknown" or rec["license"] is None  # unlicensed adapter: the stricter, unknown


def test_stricter_license_governs(tiny_llama, tiny_lora, tmp_path):
    from quantkit.hub import resolve_model
    from quantkit.licenses import stricter_license
    from quantkit.lora import load_adapter

    nc = tmp_path / "nc"
    shutil.copytree(tiny_lora, nc)
    (nc / "README.md").write_text("---\nlicense: cc-by-nc-4.0\n---\n# adapter\n")
    base = resolve_model(str(tiny_llama))
    ad = load_adapter(str(nc))
    assert stricter_license({"license": base.license}, {"license": ad.license})["license"] == "cc-by-nc-4.0"
    assert stricter_license({"license": "cc-by-nc-4.0"}, {"license": "mit"})["license"] == "cc-by-nc-4.0"
    assert stricter_license({"license": "apache-2.0"}, {"license": "mit"})["license"] == "apache-2.0"


def test_eval_hf_adapter_at_run_time(tiny_llama, tiny_lora, merged):
    """BASE+ADAPTER as reference; the plain HF base + PEFT at run time scores ~0 KLD, the base alone does not."""
    from quantkit.evaluate import evaluate

    rep = evaluate(f"{tiny_llama}+{tiny_lora}", [f"{tiny_llama}+{tiny_lora}", str(tiny_llama)], ctx=128,
                   max_tokens=384, write_manifest=False, threads=2)
    with_ad, plain = rep.rows
    assert rep.base["sha"].startswith("merged-") and with_ad["adapter"]
    assert with_ad["kld_mean"] < 1e-4 and with_ad["top1"] > 0.99
    assert plain["kld_mean"] > 0.05


# -- GGUF: merged then quantised, and the GGUF adapter at run time ----------------------------------

@pytest.fixture(scope="module")
def merged_set(tiny_llama, tiny_lora, tmp_path_factory):
    from quantkit.gguf import quantize_gguf

    out = tmp_path_factory.mktemp("lora") / "merged"
    return quantize_gguf(str(tiny_llama), ["Q8_0", "Q4_K_M"], out, threads=2, adapter=str(tiny_lora),
                         outtype="f32")


@pytest.fixture(scope="module")
def base_set(tiny_llama, tmp_path_factory):
    from quantkit.gguf import quantize_gguf

    return quantize_gguf(str(tiny_llama), ["F32", "Q4_K_M"], tmp_path_factory.mktemp("lora") / "base", threads=2,
                         outtype="f32")


def test_merged_then_quantised_q8_close_to_merged(merged_set, merged, tiny_lora):
    from quantkit.manifest import Manifest

    ids = _ids(merged.path)
    ref = hf_logits(merged.path, ids)
    q8, _ = gguf_logits(merged_set.folder / next(n for n in Manifest.load(merged_set.folder).artifacts
                                                 if "Q8_0" in n), ids)
    assert mean_kl(ref, q8) < 2e-3
    base = Manifest.load(merged_set.folder).base
    assert base["adapter"]["local_path"] == str(tiny_lora) and base["merged_from"]["model_name"].startswith("tiny")
    assert base["model_name"] == tiny_lora.name
    # the card names base and adapter; base_model is the fine-tune's repo, else the base's (a fine-tune of it)
    from quantkit.card import render_card

    card = render_card(merged_set.folder)
    assert "Fine-tune: base model + LoRA adapter" in card.text and f"local `{tiny_lora.name}`" in card.text
    assert "rank 8, alpha 16" in card.text and "base_model" not in card.metadata
    m = Manifest.load(merged_set.folder)
    m.base["merged_from"]["id"] = "org/base"
    assert render_card(merged_set.folder, manifest=m).metadata["base_model_relation"] == "finetune"
    m.base["id"] = "org/fine-tune"
    meta = render_card(merged_set.folder, manifest=m).metadata
    assert (meta["base_model"], meta["base_model_relation"]) == ("org/fine-tune", "quantized")


@pytest.fixture(scope="module")
def lora_folder(tiny_llama, tiny_lora, tmp_path_factory):
    """`quantkit lora` output: the adapter as an F32 GGUF LoRA, with its quantkit.json."""
    from quantkit.cli import main

    out = tmp_path_factory.mktemp("lora") / "adapter"
    try:
        main(["lora", str(tiny_lora), "--base", str(tiny_llama), "--out", str(out), "--outtype", "f32"])
    except SystemExit as e:
        assert e.code in (0, None)
    return out


def _artifact(folder: Path, part: str) -> Path:
    from quantkit.manifest import Manifest

    return folder / next(n for n in Manifest.load(folder).artifacts if part in n)


def test_gguf_adapter_on_f32_base_matches_peft(tiny_llama, tiny_lora, base_set, lora_folder):
    from quantkit.manifest import Manifest

    m = Manifest.load(lora_folder)
    (name, rec), = m.artifacts.items()
    assert rec["format"] == "gguf-lora" and m.artifact_is_intact(name) and m.base["adapter"]["rank"] == 8
    f32 = _artifact(base_set.folder, "F32")
    ids = _ids(tiny_llama)
    import llama_cpp

    llm = llama_cpp.Llama(str(f32), n_ctx=128, n_batch=128, logits_all=True, verbose=False, n_threads=2,
                          lora_path=str(lora_folder / name))
    try:
        llm.eval(ids)
        got = np.array(llm.scores[:len(ids)], dtype=np.float32)
    finally:
        llm.close()
    ref = peft_logits(tiny_llama, tiny_lora, ids)
    plain, _ = gguf_logits(f32, ids)
    assert rel_err(got, ref) < 1e-3
    assert rel_err(plain, ref) > 50 * rel_err(got, ref)  # the adapter is really applied


def test_eval_table_adapter_on_q4_base_vs_merged_q4_then_card_and_push(tiny_llama, tiny_lora, base_set, merged_set,
                                                                      lora_folder, run_cli, hub_server):
    from quantkit.card import render_card

    q4_base, f32_base = _artifact(base_set.folder, "Q4_K_M"), _artifact(base_set.folder, "F32")
    q4_merged = _artifact(merged_set.folder, "Q4_K_M")
    gguf_lora = _artifact(lora_folder, "LoRA")
    args = ["eval", f"{tiny_llama}+{tiny_lora}", f"{q4_base}+{gguf_lora}", q4_merged, f"{f32_base}+{tiny_lora}",
            "--ctx", "128", "--max-tokens", "384", "--threads", "2"]
    code, out, err = run_cli(*args, "--json")
    assert code == 0, err
    rep = json.loads(out)
    on_q4, merged_q4, on_f32 = rep["variants"]
    assert on_q4["name"].endswith("+" + gguf_lora.stem) and on_q4["adapter"] == str(gguf_lora)
    assert merged_q4["adapter"] is None and on_f32["adapter"].endswith(".gguf")  # PEFT folder converted once
    assert on_f32["kld_mean"] < 1e-4  # the GGUF adapter on the full-precision base is the reference itself
    for row in (on_q4, merged_q4):
        assert 1e-4 < row["kld_mean"] < 0.5 and row["tokenizer_match"]
    # both paths measured on the same tokens against the same reference: the difference is the table's point
    assert on_q4["tokens"] == merged_q4["tokens"] and on_q4["kld_mean"] != merged_q4["kld_mean"]
    code, out, err = run_cli(*args, "--no-write")
    assert code == 0 and gguf_lora.stem in out and "Q4_K_M" in out
    # the adapter folder's card: which quantised bases it was measured on, with what loss
    card = render_card(lora_folder)
    assert "## Measured on quantised bases" in card.text and "Not measured" not in card.text
    q4_line = next(ln for ln in card.text.splitlines() if ln.startswith(f"| {q4_base.stem} |"))
    assert f"{on_q4['kld_mean']:.4f}" in q4_line
    assert card.metadata["library_name"] == "gguf" and "lora" in card.metadata["tags"]
    # push: the adapter folder's files, its card and quantkit.json
    code, out, err = run_cli("push", lora_folder, "--repo", "alice-org/tiny-lora-GGUF", "--license", "apache-2.0")
    assert code == 0, err
    files = hub_server.files("alice-org/tiny-lora-GGUF")
    assert {gguf_lora.name, "README.md", "quantkit.json"} <= set(files)
    assert files[gguf_lora.name] == gguf_lora.read_bytes()


@pytest.mark.slow
def test_smollm2_lora_both_paths(smollm2_hf, tmp_path):
    from quantkit.evaluate import evaluate
    from quantkit.gguf import quantize_gguf

    lora = build_lora(smollm2_hf, "smollm2", r=16)
    merged_res = quantize_gguf(str(smollm2_hf), ["Q8_0", "Q4_K_M"], tmp_path / "m", adapter=str(lora))
    base_res = quantize_gguf(str(smollm2_hf), ["Q4_K_M"], tmp_path / "b")
    merged_q8, merged_q4 = _artifact(merged_res.folder, "Q8_0"), _artifact(merged_res.folder, "Q4_K_M")
    base_q4 = _artifact(base_res.folder, "Q4_K_M")
    rep = evaluate(f"{smollm2_hf}+{lora}", [str(merged_q8), str(merged_q4), f"{base_q4}+{lora}"], ctx=256,
                   max_tokens=1024, write_manifest=False)
    q8, mq4, bq4 = rep.rows
    assert q8["kld_mean"] < 0.02 and mq4["kld_mean"] < 0.3 and bq4["kld_mean"] < 0.5


# -- recipes ------------------------------------------------------------------------------------------

def test_recipe_adapter_merges_and_keys_on_the_adapter(tmp_path, tiny_llama, tiny_lora, run_cli):
    from test_pipeline import tiny_recipe

    r = tiny_recipe(tmp_path, tiny_llama, types=("Q8_0",), extra=f"adapter: {tiny_lora}\n")
    code, out, err = run_cli("run", r, "--json")
    assert code == 0, (out + err)[-3000:]
    res = json.loads(out)
    (v,) = res["variants"]
    assert v["status"] == "done" and v["eval"]["kld_mean"] < 2e-3  # Q8_0 of the merged model vs the merged model
    folder = Path(v["path"]).parent
    assert folder.name == f"{tiny_lora.name}-GGUF"
    base = json.loads((folder / "quantkit.json").read_text())["base"]
    assert base["adapter"]["sha"].startswith("local-") and base["sha"].startswith("merged-")
    code, out, err = run_cli("run", r, "--dry-run")
    assert code == 0 and "to do" not in out, out
    # another adapter: a new identity, so the stages are to do again
    other = build_lora(tiny_llama, "tiny-llama", seed=1)
    r = tiny_recipe(tmp_path, tiny_llama, types=("Q8_0",), extra=f"adapter: {other}\n")
    code, out, err = run_cli("run", r, "--dry-run")
    assert code == 0, err
    assert "quantize:Q8_0" in out and "to do" in out
