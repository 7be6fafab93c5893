"""The base's reference in bounded memory (issue 24 item 0): the fp32 base scored a layer at a time gives the
whole model's logits, holds one block's weights at a time, fits where the whole model does not, and `plan`
states what it needs."""

from __future__ import annotations

import json

import fixtures_models as fm
import pytest
import torch

from quantkit.engines import hf_stream
from quantkit.engines.hf import HFSession, Transformers
from quantkit.engines.hf_stream import StreamedSession, stream_check

pytestmark = pytest.mark.unit


def _windows(path, n=5, length=48, seed=0):
    cfg = json.loads((path / "config.json").read_text())
    vocab = cfg.get("vocab_size") or cfg["text_config"]["vocab_size"]
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, min(vocab, 2000), (length,), generator=g).tolist() for _ in range(n)]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_streamed_logits_are_the_whole_models(arch, monkeypatch):
    """Every window's logits equal the whole fp32 model's (Gemma-2: per-layer sliding-window masks and logit
    soft-capping come from the model's own code), with windows split into several groups."""
    if arch == "gemma2" and not fm.tiny_arch_available(arch):
        pytest.skip("this transformers has no gemma2")
    path = fm.build_tiny(arch)
    wins = _windows(path)
    whole = HFSession(path, 2)
    want = [whole.score(w) for w in wins]
    monkeypatch.setattr(hf_stream, "GROUP_BYTES", 1)  # one window per group: the group bookkeeping is exercised
    s = StreamedSession(path, 2)
    got = list(s.score_windows(wins))
    assert len(got) == len(wins)
    for a, b in zip(want, got):
        assert a.shape == b.shape
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), float((a - b).abs().max())
    # one block's weights at a time, and none left behind
    blocks: dict[str, int] = {}
    for name, p in whole.model.named_parameters():
        blocks[hf_stream.block_of(name)] = blocks.get(hf_stream.block_of(name), 0) + p.numel() * 4
    assert 0 < s.peak_block_bytes <= max(blocks.values())
    assert all(p.device.type == "meta" for p in s.model.parameters())


def test_models_transformers_converts_are_loaded_whole():
    """Mixtral's experts are fused by transformers on load: not streamable, said why, and the reference falls
    back to the whole model (the same numbers)."""
    path = fm.build_tiny("mixtral")
    ok, why = stream_check(path)
    assert not ok and "converts" in why and "on load" in why
    session = Transformers().open_reference(path, ctx=64, threads=2)
    assert isinstance(session, HFSession)
    assert stream_check(fm.build_tiny("llama")) == (True, None)


def test_plan_states_the_reference_and_counts_it():
    """`plan` lists the base reference per model: a layer at a time for a dense model (far below 4 bytes a
    parameter), the whole model in fp32 for an MoE model; every job's RAM includes it."""
    from quantkit.plan import plan

    dense = plan(str(fm.build_tiny("llama")))
    assert "a layer at a time" in dense.reference.note
    assert dense.reference.ram_bytes < 4 << 30
    assert all(n.ram_bytes >= dense.reference.ram_bytes for n in dense.needs.values())
    assert "base reference" in dense.table()
    moe = plan(str(fm.build_tiny("mixtral")))
    assert "the whole model" in moe.reference.note
    assert moe.reference.ram_bytes >= moe.params_total * 4


def test_plan_reference_of_a_70b():
    """Llama-3.3-70B from its config: the streamed reference needs about a layer and the embedding in fp32
    plus the hidden states (under 16 GB), not the 282 GB of the whole model in fp32."""
    from quantkit.plan import plan_from_config

    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
           "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
           "num_key_value_heads": 8, "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
           "max_position_embeddings": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    p = plan_from_config(cfg, model="Llama-3.3-70B")
    assert p.params_total * 4 > 280e9
    assert 4e9 < p.reference.ram_bytes < 16e9, p.reference
    assert p.needs["gguf"].ram_bytes == p.reference.ram_bytes  # the converter streams: the reference decides
