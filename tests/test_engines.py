"""quantkit.engines: one interface over llama.cpp and transformers (vLLM's side is in test_vllm.py). The same
unquantised SmolLM2 (cut to 4 layers) in both engines must give the same token ids, the same logits and the same
greedy continuation: what lets measurement be written once above them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantkit import engines
from quantkit.errors import QuantkitError

THREADS = 2


@pytest.mark.unit
def test_choose_and_the_rows(tmp_path, monkeypatch):
    assert set(engines.ENGINES) == {"llama.cpp", "transformers", "vllm"}
    for name in engines.ENGINES:
        eng = engines.get(name)
        assert eng.name == name and eng.kind in ("gguf", "hf") and eng.reference in engines.ENGINES
    assert engines.choose("gguf", tmp_path / "m.gguf") == ("llama.cpp", None)
    folder = tmp_path / "awq"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "awq", "bits": 4, "group_size": 64}}))
    monkeypatch.setenv("QUANTKIT_VLLM", "off")
    assert engines.choose("hf", folder, "transformers") == ("transformers", None)
    name, note = engines.choose("hf", folder)
    assert name == "transformers" and note == "not checked in vLLM here: vLLM is turned off (QUANTKIT_VLLM=off)"
    with pytest.raises(QuantkitError, match=r"^--engine vllm: awq: vLLM is turned off"):
        engines.choose("hf", folder, "vllm")
    with pytest.raises(QuantkitError, match="--engine 'tgi': must be one of auto, vllm, transformers"):
        engines.choose("hf", folder, "tgi")
    with pytest.raises(QuantkitError, match="unknown engine 'tgi'"):
        engines.get("tgi")


@pytest.fixture(scope="module")
def same_model(tmp_path_factory):
    """The 4-layer SmolLM2 as an HF folder and as llama.cpp's unquantised (F32) GGUF of it."""
    import fixtures_models as fm

    from quantkit.gguf import WORK_DIR, quantize_gguf

    hf = fm.build_smollm2_layers(4)
    out = tmp_path_factory.mktemp("engines") / "gguf"
    quantize_gguf(str(hf), ["Q8_0"], out, verify=False)
    (f32,) = (out / WORK_DIR).glob("*.gguf")
    return hf, f32


@pytest.fixture(scope="module")
def window(same_model):
    from transformers import AutoTokenizer

    from quantkit.texts import builtin_eval_text

    hf, _ = same_model
    tok = AutoTokenizer.from_pretrained(hf)
    text = builtin_eval_text()[:2000]
    return text, tok(text, add_special_tokens=False).input_ids[:96]


def test_both_engines_give_the_same_tokens_logits_and_greedy_text(same_model, window):
    import torch

    hf, f32 = same_model
    text, ids = window
    llama, hft = engines.get("llama.cpp"), engines.get("transformers")
    # the engine's own tokenisation: llama.cpp's vocabulary and the folder's tokenizer agree with the base's ids
    assert llama.tokens(f32, text)[0][:len(ids)] == ids
    assert hft.tokens(hf, text)[0][:len(ids)] == ids
    assert hft.tokens(f32.parent, text) == (None, None)  # a folder without a tokenizer of its own
    a = llama.open(f32, ctx=128, threads=THREADS)
    b = hft.open(hf, ctx=128, threads=THREADS)
    try:
        assert not a.sparse and not b.sparse and "llama.cpp" in a.label and "transformers" in b.label
        la, lb = a.score(ids).clone(), b.score(ids)
        assert la.shape == lb.shape == (len(ids), lb.shape[1])
        pa, pb = torch.log_softmax(la.double(), -1), torch.log_softmax(lb.double(), -1)
        kld = (pb.exp() * (pb - pa)).sum(-1)
        # the same fp32 weights, only the kernels' rounding differs: measured KLD 2.6e-7, top-1 100%
        assert kld.mean() < 1e-5, kld.mean()
        assert (la.argmax(-1) == lb.argmax(-1)).float().mean() > 0.99
        ga, gb = a.generate(ids[:32], 8), b.generate(ids[:32], 8)
        assert len(ga) == 8 and ga == gb, (ga, gb)
        assert ga[0] == int(lb[31].argmax())  # greedy: the argmax of the prompt's last position
    finally:
        a.close()
        b.close()


def test_a_file_llama_cpp_cannot_load_is_one_line(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(QuantkitError, match=r"llama.cpp could not load .*broken.gguf") as e:
        engines.get("llama.cpp").open(Path(bad), ctx=64, threads=THREADS)
    assert "\n" not in str(e.value)
