"""Verify on build (quantkit.verify): every artifact is loaded in its own engine and compared with its base before
quantkit calls it done; a broken one exits 1 and stays marked unverified, and push refuses it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fixtures_models as fm
import pytest

from quantkit.verify import VerifyResult, gguf_bits, kld_bound, kld_expected, verify_artifact


def test_bound_per_bit_width():
    assert [gguf_bits(t) for t in ("F16", "Q8_0", "Q6_K", "Q5_K_S", "Q4_K_M", "IQ4_XS", "MXFP4_MOE", "Q3_K_L",
                                    "IQ2_XXS", "TQ1_0")] == [16, 8, 6, 5, 4, 4, 4, 3, 2, 1]
    bounds = [kld_bound(b) for b in (8, 6, 5, 4, 3, 2, 1)]
    assert bounds == sorted(bounds) and len(set(bounds)) == len(bounds)  # fewer bits, looser bound
    r = VerifyResult(passed=False, engine="llama.cpp", tokens=255, kld=0.9, top1=0.5, bits=4, bound=kld_bound(4))
    assert VerifyResult.from_json(json.loads(json.dumps(r.to_json()))) == r
    assert "0.9" in r.problem() and "4-bit" in r.problem()


def test_a_passed_check_above_the_healthy_ceiling_is_marked_high():
    from quantkit.card import checked_line

    expected = [kld_expected(b) for b in (8, 6, 5, 4, 3, 2, 1)]
    assert expected == sorted(expected) and all(e < kld_bound(b) for e, b in zip(expected, (8, 6, 5, 4, 3, 2, 1)))
    ok = VerifyResult(passed=True, engine="transformers", tokens=255, kld=0.8 * kld_expected(4), bits=4,
                      bound=kld_bound(4), expected=kld_expected(4))
    high = VerifyResult(passed=True, engine="transformers", tokens=255, kld=1.2 * kld_expected(4), bits=4,
                        bound=kld_bound(4), expected=kld_expected(4))
    assert ok.status.endswith(" ok") and not ok.high and ok.high_line() is None
    assert high.status.endswith(" high") and high.high and "4-bit" in high.high_line()
    assert "HIGH" in checked_line(high.to_json()) and "HIGH" not in checked_line(ok.to_json())
    assert f"healthy up to {kld_expected(4):g}" in checked_line(ok.to_json())
    old = dict(high.to_json(), expected=None)  # a record made before the ceiling existed: as before
    assert VerifyResult.from_json(old).status.endswith(" ok")


# -- GGUF: a real tiny model through llama.cpp ------------------------------------------------------------------

@pytest.fixture(scope="module")
def q8_folder(tiny_llama, tmp_path_factory):
    """tiny_llama converted and quantised to Q8_0 once for this module (verify included)."""
    from quantkit.gguf import quantize_gguf

    folder = tmp_path_factory.mktemp("verify") / "tiny-GGUF"
    quantize_gguf(str(tiny_llama), ["Q8_0"], folder)
    return folder


def _seed(folder: Path, out: Path) -> Path:
    """A copy of ``folder`` with its intermediate GGUF but no artifact: quantising there skips the conversion."""
    shutil.copytree(folder, out)
    m = json.loads((out / "quantkit.json").read_text())
    for rec in m["artifacts"].values():
        (out / rec["path"]).unlink()
    m["artifacts"] = {}
    (out / "quantkit.json").write_text(json.dumps(m))
    return out


def _corrupt_q8_0(path: Path, how: str) -> None:
    """Overwrite the tensor data of every Q8_0 tensor in place (a block is an f16 scale + 32 int8 weights):
    ``weights``: random int8 weights under the real scales (finite, wrong); ``nan``: NaN scales."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader

    reader = GGUFReader(str(path), "r+")
    rng = np.random.default_rng(0)
    n = 0
    for t in reader.tensors:
        if t.tensor_type != GGMLQuantizationType.Q8_0:
            continue
        blocks = t.data.reshape(-1, 34)
        if how == "weights":
            blocks[:, 2:] = rng.integers(0, 256, blocks[:, 2:].shape, dtype=np.uint8)
        else:
            blocks[:, 0:2] = np.frombuffer(np.float16(np.nan).tobytes(), dtype=np.uint8)
        n += 1
    reader.data.flush()
    del reader
    assert n > 0


def test_healthy_gguf_passes_and_rerun_reuses_the_record(q8_folder, tiny_llama):
    from quantkit.gguf import quantize_gguf

    m = json.loads((q8_folder / "quantkit.json").read_text())
    (name, rec), = m["artifacts"].items()
    v = rec["verify"]
    assert v["passed"] and not v["skipped"] and v["error"] is None
    assert v["engine"].startswith("llama.cpp") and 250 <= v["tokens"] <= 256 and v["bits"] == 8
    assert 0 <= v["kld"] < v["bound"] == kld_bound(8) and v["top1"] > 0.9
    res = quantize_gguf(str(tiny_llama), ["Q8_0"], q8_folder)
    assert res.reused == [name] and res.manifest.artifact(name)["verify"] == v  # not measured again
    assert f"KLD {v['kld']:.4f} ok" in res.table()


def test_broken_gguf_exits_1_stays_unverified_and_push_refuses(q8_folder, tiny_llama, tmp_path, monkeypatch,
                                                               run_cli, hub_server):
    """A quantiser that writes garbage weights: quantkit gguf says so in one line, keeps the file marked
    unverified, push refuses it, and --allow-unverified publishes it with a visible line in the card."""
    from quantkit import gguf as gguf_mod

    real = gguf_mod.quantize_file

    def broken_quantiser(src, dest, gtype, **kw):
        out = real(src, dest, gtype, **kw)
        _corrupt_q8_0(Path(dest), "weights")
        return out

    monkeypatch.setattr(gguf_mod, "quantize_file", broken_quantiser)
    out = _seed(q8_folder, tmp_path / "broken-GGUF")
    code, stdout, err = run_cli("gguf", tiny_llama, "--types", "Q8_0", "--out", out)
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    name = f"{Path(tiny_llama).name}-Q8_0.gguf"
    assert f"verify failed: {name}: mean KLD" in lines[0] and "bound for 8-bit" in lines[0]
    assert (out / name).is_file()  # kept for inspection
    v = json.loads((out / "quantkit.json").read_text())["artifacts"][name]["verify"]
    assert v["passed"] is False and v["kld"] > 10 * v["bound"]  # far outside, not a borderline call

    code, stdout, err = run_cli("push", out, "--repo", "alice-org/broken-GGUF")
    assert code == 2 and "not publishing unverified artifacts" in err and name in err
    assert hub_server.counts["commit"] == 0
    code, stdout, err = run_cli("push", out, "--repo", "alice-org/broken-GGUF", "--allow-unverified")
    assert code == 0, err
    assert f"publishing {name} unverified" in err
    card = (out / "README.md").read_text()
    assert "**Warning: unverified.**" in card and f"`{name}` — mean KLD" in card


def test_no_verify_is_recorded_as_skipped_and_a_rerun_verifies(q8_folder, tiny_llama, tmp_path, run_cli):
    out = _seed(q8_folder, tmp_path / "skip-GGUF")
    code, stdout, err = run_cli("gguf", tiny_llama, "--types", "Q4_K_M", "--out", out, "--no-verify", "--json")
    assert code == 0, err
    (name, rec), = json.loads(stdout)["artifacts"].items()
    assert rec["verify"]["skipped"] and rec["verify"]["passed"] is False
    code, _, err = run_cli("push", out, "--repo", "alice-org/x", "--dry-run")
    assert code == 2 and "built with --no-verify" in err
    code, stdout, err = run_cli("gguf", tiny_llama, "--types", "Q4_K_M", "--out", out)
    assert code == 0, err
    v = json.loads((out / "quantkit.json").read_text())["artifacts"][name]["verify"]
    assert v["passed"] and v["kld"] < kld_bound(4) and "reused" in stdout and "ok" in stdout


def test_nan_and_unloadable_gguf_fail(q8_folder, tiny_llama, tmp_path):
    good = next(q8_folder.glob("*-Q8_0.gguf"))
    nan = tmp_path / "nan.gguf"
    shutil.copy(good, nan)
    _corrupt_q8_0(nan, "nan")
    r = verify_artifact(tiny_llama, nan, bits=8)
    assert not r.passed and "NaN/inf" in r.error
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    r = verify_artifact(tiny_llama, cut, bits=8)
    assert not r.passed and "llama.cpp could not load" in r.error and r.kld is None


# -- HF folders through transformers ---------------------------------------------------------------------------

def test_hf_folder_with_wrong_weights_fails(tiny_llama):
    """The base itself passes with KLD 0; a folder holding another model's weights (same architecture and
    tokenizer, another seed) loads fine but is far from the base."""
    same = verify_artifact(tiny_llama, tiny_llama, bits=8)
    assert same.passed and same.kld == pytest.approx(0, abs=1e-6) and same.top1 == 1.0
    assert same.engine.startswith("transformers")
    other = verify_artifact(tiny_llama, fm.build_tiny("llama", seed=1), bits=4)
    assert not other.passed and other.error is None and other.kld > 2 * other.bound


def test_hf_folder_missing_or_carrying_extra_weights_fails(tiny_llama, tmp_path):
    """transformers loads a folder that lacks a weight (left at its initial value: a norm of ones is close
    enough to pass a KLD bound) or holds one its model has no place for; its loading report is the finding."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    f = next(broken.glob("*.safetensors"))
    weights = load_file(f)
    weights.pop("model.layers.0.post_attention_layernorm.weight")
    weights["model.extra.weight"] = weights["model.norm.weight"].clone()
    save_file(weights, f, metadata={"format": "pt"})
    r = verify_artifact(tiny_llama, broken, bits=4)
    assert not r.passed and r.kld is None
    assert "1 weight missing (model.layers.0.post_attention_layernorm.weight)" in r.error
    assert "1 weight unexpected (model.extra.weight)" in r.error


@pytest.mark.unit
def test_loading_report_in_a_few_words():
    from quantkit.engines.hf import load_problem

    assert load_problem({"missing_keys": set(), "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}) is None
    msg = load_problem({"missing_keys": {"a", "c", "b"}, "mismatched_keys": [("w", (2, 2), (3, 3))]})
    assert msg == "3 weights missing (a, b and 1 more); 1 weight of the wrong shape (w)"
