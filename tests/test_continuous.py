"""The continuous reference model (quantkit.demo): weights redrawn from their quantisation cells, then healed."""

import json

import pytest
import torch

from quantkit.demo import cell_widths, draw_from_cells, heal
from quantkit.errors import QuantkitError


class Gridded(torch.nn.Module):
    """An embedding on a Q8_0 grid, a linear layer on a Q4_1 grid (blocks of 32), a norm vector."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        rows, cols = 8, 64
        blocks = rows * cols // 32
        q4 = torch.randint(0, 16, (blocks, 32), generator=g).float()
        q4[:, 0], q4[:, 1] = 0, 15  # Q4_1 maps each block's min to 0 and its max to 15
        d4, m4 = torch.rand(blocks, 1, generator=g) * 0.01 + 1e-3, -torch.rand(blocks, 1, generator=g)
        q8 = torch.randint(-127, 128, (blocks, 32), generator=g).float()
        q8[:, 0] = 127
        d8 = torch.rand(blocks, 1, generator=g) * 0.01 + 1e-3
        self.embed_tokens = torch.nn.Parameter((q8 * d8).reshape(rows, cols))
        self.proj = torch.nn.Parameter((q4 * d4 + m4).reshape(rows, cols))
        self.norm = torch.nn.Parameter(torch.ones(cols) * 0.5)
        self.d = {"embed_tokens": d8, "proj": d4}


@pytest.mark.unit
def test_draw_stays_in_each_cell_off_the_grid_and_is_seeded():
    m = Gridded()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    for n in ("embed_tokens", "proj"):
        w = cell_widths(n, before[n]).reshape(-1, 32)
        assert torch.allclose(w[:, :1], m.d[n], rtol=1e-5)
    assert draw_from_cells(m, seed=3) == 2 * 8 * 64
    for n in ("embed_tokens", "proj"):
        moved = (m.get_parameter(n).detach() - before[n]).reshape(-1, 32)
        assert (moved.abs() <= m.d[n] / 2 + 1e-7).all()  # inside its own cell
        assert moved.abs().mean() > m.d[n].mean() / 8  # and spread over it (uniform: mean |u - 1/2| = 1/4)
        assert all(len(set(r.tolist())) == 32 for r in m.get_parameter(n).detach().reshape(-1, 32))
        with pytest.raises(QuantkitError, match="not on a"):
            cell_widths(n, m.get_parameter(n).detach())  # no longer on the grid
    assert torch.equal(m.norm.detach(), before["norm"])  # vectors are kept
    again = Gridded()
    draw_from_cells(again, seed=3)
    assert torch.equal(again.proj.detach(), m.proj.detach())
    other = Gridded()
    draw_from_cells(other, seed=4)
    assert not torch.equal(other.proj.detach(), m.proj.detach())


def test_heal_brings_a_noisy_copy_back_towards_its_teacher(tiny_llama, calibration_text, eval_text):
    import copy

    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    student = copy.deepcopy(teacher)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in student.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=g) * p.std() * 0.5)
    held = torch.tensor([tok(eval_text).input_ids[:128]])

    def kl():
        with torch.no_grad():
            t, s = teacher(held).logits.log_softmax(-1)[0], student(held).logits.log_softmax(-1)[0]
        return float(F.kl_div(s, t, log_target=True, reduction="batchmean"))

    before = kl()
    losses = heal(student, teacher, tok(calibration_text[:20000]).input_ids, steps=12, batch=2, seq=64, lr=1e-3)
    assert len(losses) == 12
    after = kl()
    print(f"held-out KL to the teacher {before:.4f} -> {after:.4f}")
    assert after < 0.8 * before


@pytest.mark.slow
def test_the_continuous_smollm2_is_off_the_grid_and_healed(smollm2_continuous):
    from safetensors.torch import load_file

    rec = json.loads((smollm2_continuous / "continuous.json").read_text())
    e = rec["eval"]
    print(f"held-out PPL: gridded {e['gridded_ppl']:.3f}, drawn {e['drawn']['ppl']:.3f}, "
          f"healed {e['healed']['ppl']:.3f}")
    assert e["healed"]["ppl"] < e["drawn"]["ppl"]
    assert e["healed"]["kld_mean"] < e["drawn"]["kld_mean"]
    sd = load_file(smollm2_continuous / "model.safetensors")
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                 "model.layers.29.mlp.down_proj.weight"):
        with pytest.raises(QuantkitError, match="not on a"):
            cell_widths(name, sd[name])
        assert len(set(sd[name].reshape(-1, 32)[0].tolist())) == 32
    assert "healed (this model)" in (smollm2_continuous / "README.md").read_text()
