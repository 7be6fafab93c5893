"""AWQ/GPTQ outputs are saved in safetensors shards with an index, as the Hub and vLLM expect.

Both engines (gptqmodel's ``save``, llm-compressor's ``save_pretrained``) get quantkit's explicit shard size; a
tiny size on a tiny model forces several shards, which transformers loads back.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from quantkit.hfquant import MAX_SHARD_SIZE, run


@pytest.mark.parametrize("fmt", ["classic", pytest.param("compressed-tensors", marks=pytest.mark.slow)])
def test_weights_are_sharded_with_an_index_and_load_back(fmt, tiny_llama, tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)  # gptqmodel must not leave ./logs behind
    assert MAX_SHARD_SIZE == "5GB"
    res = run("gptq", str(tiny_llama), fmt=fmt, bits=8, samples=4, seq_len=64, out=tmp_path / "v",
              max_shard_size="8MB")
    folder = Path(res.folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) >= 2 and not (folder / "model.safetensors").exists()
    n = len(shards)
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert set(index["weight_map"].values()) == set(shards)
    per_shard = {s: [t for t, f in index["weight_map"].items() if f == s] for s in shards}
    for s, tensors in per_shard.items():  # a shard is within the size, or one tensor bigger than it
        assert len(tensors) == 1 or (folder / s).stat().st_size <= 8 * 1024 ** 2 + 100_000, (s, len(tensors))
    rec = res.manifest.artifact(res.name)
    recorded = {f["path"] for f in rec["files"]}
    assert set(shards) | {"model.safetensors.index.json"} <= recorded
    assert rec["size"] == sum((folder / s).stat().st_size for s in shards)
    recipe = json.loads((folder / "quantkit-recipe.json").read_text())
    assert "8MB" in json.dumps(recipe["engine_call"])
    # every shard is read back: the 8-bit model tracks the base (a tensor left out would stay random)
    torch.set_num_threads(2)
    ids = torch.arange(10, 138).unsqueeze(0)
    with torch.no_grad():
        q = AutoModelForCausalLM.from_pretrained(str(folder), device_map="cpu")(ids).logits.float()
        b = AutoModelForCausalLM.from_pretrained(str(tiny_llama), device_map="cpu")(ids).logits.float()
    kl = torch.nn.functional.kl_div(q.log_softmax(-1), b.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1).mean().item()
    assert 0 <= kl < 0.02, kl
    assert not re.search(r"\.partial", " ".join(p.name for p in tmp_path.iterdir()))
