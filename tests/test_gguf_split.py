"""GGUFs over the Hub's file limit: split by llama.cpp's llama-gguf-split into one artifact of llama.cpp-named
shards, which resume, eval, bench, the card and push all treat as one.

The end-to-end check runs on a tiny 2-layer model by default (a tiny --split-max-size forces the split) and on
SmolLM2-135M in the slow set.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from quantkit.errors import QuantkitError
from quantkit.gguf import artifact_name, quantize_gguf
from quantkit.ggufio import (
    DEFAULT_SPLIT_MAX_SIZE,
    gguf_entry_points,
    quantize_file,
    shard_count,
    shard_name,
    split_size_bytes,
)
from quantkit.manifest import Manifest
from quantkit.util import sha256_file

DATA = Path(__file__).parent / "data"


# -- sizes, names, plan, recipe: no model needed ---------------------------------------------------------

def test_split_sizes_in_llama_cpp_spelling():
    assert split_size_bytes("500M") == 500_000_000
    assert split_size_bytes("48g") == 48_000_000_000
    assert split_size_bytes(None) == split_size_bytes(DEFAULT_SPLIT_MAX_SIZE) < 50 * 1000 ** 3
    for bad in ("48GB", "1.5G", "0M", "12", "-3G", "big"):
        with pytest.raises(QuantkitError, match="500M or 48G"):
            split_size_bytes(bad)
    assert shard_name("M-Q8_0", 1, 3) == "M-Q8_0-00001-of-00003.gguf"
    assert shard_count(47e9) == 1 and shard_count(75e9) == 2 and shard_count(141e9) == 3
    names = ["M-Q4_K_M.gguf", "M-Q8_0-00001-of-00002.gguf", "M-Q8_0-00002-of-00002.gguf"]
    assert [p.name for p in gguf_entry_points(names)] == ["M-Q4_K_M.gguf", "M-Q8_0-00001-of-00002.gguf"]


def test_plan_names_the_types_split_for_a_70b_model():
    from quantkit.plan import plan_from_config

    p = plan_from_config(json.loads((DATA / "llama-3.3-70b-instruct.config.json").read_text()), model="L70")
    shards = {r.name.removeprefix("GGUF "): r.shards for r in p.rows if r.method == "gguf"}
    assert shards["F16"] == 3 and shards["Q8_0"] == 2 and shards["Q6_K"] == 2  # 141, 75, 58 GB
    assert shards["Q4_K_M"] == 1 and shards["Q2_K"] == 1
    assert "F16 (3 files), Q8_0 (2 files), Q6_K (2 files)" in p.table()
    assert json.loads(json.dumps(p.to_json()))["rows"][-1]["shards"] == 1


def test_recipe_split_max_size_is_checked(tmp_path):
    from quantkit.recipe import load_recipe

    r = tmp_path / "r.yaml"
    r.write_text("quantkit: 1\nmodel: builtin:smollm2-135m\nvariants:\n"
                 "  - method: gguf\n    types: [Q8_0]\n    split_max_size: 500m\n")
    assert load_recipe(str(r)).variants[0].params["split_max_size"] == "500M"
    r.write_text(r.read_text().replace("500m", "2.5GB"))
    with pytest.raises(QuantkitError, match=r"r.yaml:6: variants\[0\].split_max_size: .*500M or 48G"):
        load_recipe(str(r))


def test_cli_rejects_a_bad_split_size_before_any_work(tmp_path, run_cli):
    code, out, err = run_cli("gguf", str(tmp_path / "nowhere"), "--types", "Q8_0", "--split-max-size", "48GB",
                             "--out", tmp_path / "o")
    assert code != 0 and "Traceback" not in err
    assert err.strip().startswith("error: ") and "500M or 48G" in err
    assert not (tmp_path / "o").exists()


# -- end to end -----------------------------------------------------------------------------------------

def _logits(path: Path, n_tokens: int = 48) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=128, n_batch=128, logits_all=True, verbose=False, n_threads=2)
    try:
        ids = llm.tokenize(b"The quick brown fox jumps over the lazy dog, and then it runs back into the forest "
                           b"to find its way home before the night falls on the quiet valley.", add_bos=True)
        ids = ids[:n_tokens]
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)], dtype=np.float32)
    finally:
        llm.close()


def check_split_set(hf: Path, tmp: Path, split: str, hub, split_type: str = "Q8_0", other: str = "Q4_K_M") -> None:
    """Build a set with ``split``, check it, resume it, evaluate, bench, card, push and download it back."""
    from huggingface_hub import snapshot_download

    from quantkit.bench import bench
    from quantkit.card import render_card
    from quantkit.evaluate import evaluate, resolve_variants
    from quantkit.publish import push

    out = tmp / "set"
    res = quantize_gguf(str(hf), [split_type, other], out, split_max_size=split, threads=2)
    m = Manifest.load(out)
    limit = split_size_bytes(split)
    name = artifact_name(m.base["model_name"], split_type)
    rec = m.artifact(name)
    n = len(rec["files"])
    stem = name[:-len(".gguf")]
    assert n >= 2 and rec["split"]["shards"] == n and rec["split"]["max_size"] == split.upper()
    assert [f["path"] for f in rec["files"]] == [shard_name(stem, i, n) for i in range(1, n + 1)]
    assert rec["path"] == rec["files"][0]["path"] and not (out / name).exists()
    for f in rec["files"]:
        assert (out / f["path"]).stat().st_size == f["size"] and sha256_file(out / f["path"]) == f["sha256"]
    assert rec["size"] == sum(f["size"] for f in rec["files"]) > limit
    for r in m.artifacts.values():  # only what is over the limit is split
        assert (len(r["files"]) > 1) == (r["size"] > limit)
    assert len(m.artifact(artifact_name(m.base["model_name"], other))["files"]) == 1
    assert res.paths()[0] == out / rec["path"]
    assert not list(out.glob("*.partial")) and not list(out.glob(".*.partial"))

    # llama.cpp loads the set from its first shard with the same logits as the unsplit file
    unsplit = tmp / "unsplit.gguf"
    quantize_file(out / m.data["intermediates"]["convert"]["path"], unsplit, split_type, threads=2)
    assert sum(f["size"] for f in rec["files"]) >= unsplit.stat().st_size
    a, b = _logits(out / rec["path"]), _logits(unsplit)
    assert a.shape == b.shape and np.array_equal(a, b)

    # resume: a missing shard, then a damaged one, rebuild that artifact only
    (out / rec["files"][1]["path"]).unlink()
    again = quantize_gguf(str(hf), [split_type, other], out, split_max_size=split, threads=2)
    assert again.built == [name] and again.reused == [artifact_name(m.base["model_name"], other)]
    assert not again.converted
    assert Manifest.load(out).artifact(name)["files"] == rec["files"]  # same bytes rebuilt
    last = out / rec["files"][-1]["path"]
    data = bytearray(last.read_bytes())
    data[-1] ^= 0xFF
    last.write_bytes(bytes(data))
    assert quantize_gguf(str(hf), [split_type, other], out, split_max_size=split, threads=2).built == [name]
    assert sha256_file(last) == rec["files"][-1]["sha256"]

    # eval and bench: one variant per set, loaded from the first shard, sized as the whole set
    rep = evaluate(str(hf), [str(out)], ctx=64, max_tokens=256, threads=2)
    row = next(r for r in rep.rows if r["type"] == split_type)
    assert row["path"] == str(out / rec["path"]) and row["kld_mean"] < 0.05
    assert Manifest.load(out).artifact(name)["eval"]["tokens"] > 0
    b = bench([str(out)], prompt_tokens=16, gen_tokens=4, repeats=1, base=False, isolate=False)
    brow = next(r for r in b.rows if r["artifact"] == name)
    assert brow["size"] == rec["size"] and brow["tg_tps"] > 0
    bare = tmp / "bare"
    bare.mkdir()
    for f in rec["files"]:
        shutil.copy(out / f["path"], bare / f["path"])
    vs = resolve_variants(str(bare))
    assert [(v.path.name, v.size) for v in vs] == [(rec["path"], rec["size"])]

    # card: one row per type, with the set's size, its shard count and a command fetching the whole set
    repo = "alice/Split-GGUF"
    card = render_card(out, repo_id=repo).text
    table = [ln for ln in card.splitlines() if ln.startswith("| [") and ".gguf" in ln]
    assert len(table) == 2
    assert f"({n} shards)" in next(ln for ln in table if split_type in ln)
    assert f'hf download {repo} --include "*-{split_type}-*" --local-dir .' in card

    # push: every shard in one commit; downloaded back byte for byte
    commits = hub.counts["commit"]
    pushed = push(out, repo)
    assert pushed.commit and hub.counts["commit"] == commits + 1
    assert {f["path"] for f in rec["files"]} <= set(hub.files(repo))
    snap = Path(snapshot_download(repo))
    for f in rec["files"]:
        assert sha256_file(snap / f["path"]) == f["sha256"]
    assert not (snap / name).exists()


def test_split_set_end_to_end_tiny(tiny_llama, tmp_path, hub_server):
    check_split_set(tiny_llama, tmp_path, "14M", hub_server)  # Q8_0 16.4 MB, Q4_K_M 12.8 MB


@pytest.mark.slow
def test_split_set_end_to_end_smollm2(smollm2_hf, tmp_path, hub_server):
    check_split_set(smollm2_hf, tmp_path, "120M", hub_server)
