"""The eval's top-k + tail-sample KLD estimator on synthetic distributions (no model): unit tier."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.unit


def _pair(n=512, vocab=4000, noise=0.3, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    # Zipf-like base logits (a few likely tokens, a long tail), and a perturbed "quantised" copy
    ranks = torch.arange(1, vocab + 1, dtype=torch.float64)
    base = (-1.1 * ranks.log())[None, :].repeat(n, 1) + 0.5 * torch.randn(n, vocab, generator=g, dtype=torch.float64)
    base = base[:, torch.randperm(vocab, generator=g)]
    variant = base + noise * torch.randn(n, vocab, generator=g, dtype=torch.float64)
    targets = torch.multinomial(torch.softmax(base, -1), 1, generator=g)[:, 0]  # tokens the base would pick
    return base.float(), variant.float(), targets


@pytest.mark.parametrize("noise", [0.1, 0.5])
def test_topk_cache_kld_matches_exact(noise):
    import torch

    from quantkit.evaluate import (
        DEFAULT_TOP_K,
        TAIL_SAMPLES,
        TOPK_REL_ERROR,
        exact_kld,
        kld_vs_topk,
        topk_cache_from_logits,
    )

    base, variant, targets = _pair(noise=noise)
    c = topk_cache_from_logits(base, targets, DEFAULT_TOP_K, TAIL_SAMPLES, seed=1)
    nll, kld, top1 = kld_vs_topk(variant, targets, c["idx"], c["logp"], c["rest"], c["sidx"], c["slogp"])
    exact = exact_kld(base, variant)
    assert abs(kld.double().mean().item() - exact.mean().item()) <= TOPK_REL_ERROR * exact.mean().item()
    # without the tail samples: a lower bound (log-sum inequality), and here a visibly low one
    lumped = kld_vs_topk(variant, targets, c["idx"], c["logp"], c["rest"])[1]
    assert (lumped.double() <= exact + 1e-5).all()
    assert lumped.double().mean().item() < (1 - TOPK_REL_ERROR) * exact.mean().item()
    # NLL of the variant is exact, and top-1 agreement is the argmax comparison
    ref_nll = -torch.log_softmax(variant.double(), -1).gather(1, targets[:, None])[:, 0]
    assert torch.allclose(nll.double(), ref_nll, atol=1e-4)
    assert torch.equal(top1, variant.argmax(-1) == base.argmax(-1))


def test_identical_distributions_have_zero_kld():
    from quantkit.evaluate import kld_vs_topk, topk_cache_from_logits

    base, _, targets = _pair(n=64)
    c = topk_cache_from_logits(base, targets, 64, 64)
    _, kld, top1 = kld_vs_topk(base, targets, c["idx"], c["logp"], c["rest"], c["sidx"], c["slogp"])
    assert kld.max().item() < 1e-5 and top1.all()
