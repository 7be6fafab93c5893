"""The format tables (quantkit/formats.py) and the loose ends they close: no model, no llama.cpp build needed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from quantkit.errors import QuantkitError
from quantkit.formats import (
    GGUF_TYPES,
    HF_FORMATS,
    HF_METHODS,
    file_type_name,
    gguf_type,
    group_size_problem,
    hf_param_problems,
)
from quantkit.recipe import RecipeError, parse_recipe

pytestmark = pytest.mark.unit

DATA = Path(__file__).parent / "data"
RECIPE = "quantkit: 1\nmodel: org/m\nvariants:\n"


# -- the GGUF table -------------------------------------------------------------------------------------------

def test_gguf_table_agrees_with_gguf_py():
    import gguf

    for name, row in GGUF_TYPES.items():
        enum = "ALL_F32" if name == "F32" else f"MOSTLY_{name}"
        if hasattr(gguf.LlamaFileType, enum):  # the pinned gguf-py may lag llama.cpp by a type or two
            assert gguf.LlamaFileType[enum] == row.ftype, name
        if hasattr(gguf.GGMLQuantizationType, row.ggml_type):
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[row.ggml_type]]
            assert row.block_bits_per_weight == size * 8 / block, name
        assert file_type_name(row.ftype) == name
    assert file_type_name(999) == "ftype-999"


def test_bits_per_weight_come_from_block_sizes_or_quantize_cpp():
    bpw = {t: GGUF_TYPES[t].bits_per_weight() for t in ("Q8_0", "Q6_K", "IQ4_XS", "Q4_K_M", "Q2_K")}
    assert bpw["Q8_0"] == (8.5, "ggml block: 34 bytes / 32 weights")
    assert bpw["Q6_K"][0] == 6.5625 and bpw["IQ4_XS"][0] == 4.25
    # the K mixes keep some tensors at a higher type: llama.cpp's measured Llama-3-8B sizes, not the block size
    assert bpw["Q4_K_M"][0] == pytest.approx(4.58 * (1 << 30) * 8 / 8_030_261_248, abs=1e-3)
    assert GGUF_TYPES["Q4_K_M"].block_bits_per_weight == 4.5
    assert "quantize.cpp" in bpw["Q2_K"][1]


def test_types_llama_cpp_refuses_without_imatrix_are_marked():
    # src/llama-quant.cpp (tensor_requires_imatrix): IQ1_*, IQ2_* (IQ2_M's tensors are IQ2_S), IQ3_XXS, and Q2_K
    # tensors inside a Q2_K_S file are refused without an importance matrix.
    refused = {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "Q2_K_S"}
    marked = {n for n, r in GGUF_TYPES.items() if r.imatrix}
    assert refused <= marked
    assert not GGUF_TYPES["Q2_K"].imatrix and not GGUF_TYPES["Q4_K_M"].imatrix


def test_q2_k_s_without_calibration_fails_before_any_work(tmp_path):
    from quantkit.gguf import quantize_gguf

    # before the table, Q2_K_S went through download and conversion and failed inside llama.cpp
    with pytest.raises(QuantkitError, match="Q2_K_S need an importance matrix"):
        quantize_gguf(str(tmp_path / "no-such-model"), ["Q2_K_S"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(RecipeError, match=r"variants\[0\]\.types\[0\]: Q2_K_S needs an importance matrix"):
        parse_recipe(RECIPE + "  - {method: gguf, types: [Q2_K_S]}\n")


@pytest.mark.parametrize("spelling", ["q4-k-m", "Q4_K_M", " q4_k ", "Q4-K"])
def test_one_normaliser_for_cli_and_recipe(spelling):
    from quantkit.ggufio import normalize_types

    assert gguf_type(spelling).name == "Q4_K_M"
    assert normalize_types([spelling]) == ["Q4_K_M"]
    r = parse_recipe(RECIPE + f"  - {{method: gguf, types: ['{spelling}']}}\n")
    assert [v.name for v in r.variants] == ["Q4_K_M"]


def test_unknown_type_names_the_allowed_ones():
    with pytest.raises(QuantkitError, match=r"unknown GGUF type 'Q9_K' \(did you mean Q6_K\?\); allowed: F32, "):
        gguf_type("q9_k")


def test_card_advice_comes_from_the_table(tmp_path):
    from quantkit.card import _rows
    from quantkit.manifest import Manifest

    m = Manifest(tmp_path)
    m.artifacts["M-Q4_K_M.gguf"] = {"format": "gguf", "type": "Q4_K_M", "path": "M-Q4_K_M.gguf", "size": 10,
                                    "bits_per_weight": 4.9}
    (row,) = _rows(tmp_path, m, None)
    assert row["advice"] == GGUF_TYPES["Q4_K_M"].advice != ""


# -- GGUF header reading --------------------------------------------------------------------------------------

def test_read_gguf_header_on_a_tiny_file(tmp_path):
    import gguf
    from gguf.quants import quantize

    from quantkit.ggufio import read_gguf_header, read_gguf_info

    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint8("t.u8", 7)
    w.add_int32("t.i32", -5)
    w.add_uint64("t.u64", 1 << 40)
    w.add_float32("t.f32", 0.5)
    w.add_float64("t.f64", 0.25)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo")
    w.add_array("t.ints", [1, 2, 3])
    w.add_array("t.strs", ["a", "bc"])
    w.add_array("t.long", list(range(100)))
    w.add_uint32("llama.block_count", 1)
    w.add_file_type(GGUF_TYPES["Q8_0"].ftype)
    weights = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    q8 = quantize(weights, gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.ffn_down.weight", q8, raw_shape=q8.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.attn_norm.weight", np.ones(64, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    kv, tensors = read_gguf_header(path, max_array=64)
    assert kv["t.u8"] == 7 and kv["t.i32"] == -5 and kv["t.u64"] == 1 << 40
    assert kv["t.f32"] == 0.5 and kv["t.f64"] == 0.25 and kv["t.bool"] is True and kv["t.str"] == "héllo"
    assert kv["t.ints"] == [1, 2, 3] and kv["t.strs"] == ["a", "bc"] and kv["t.long"] == 100  # long: its length
    assert kv["general.architecture"] == "llama"
    assert tensors == [("blk.0.ffn_down.weight", int(gguf.GGMLQuantizationType.Q8_0), (64, 4)),
                       ("blk.0.attn_norm.weight", int(gguf.GGMLQuantizationType.F32), (64,))]
    info = read_gguf_info(path)
    assert info["file_type"] == "Q8_0" and info["params"] == 4 * 64 + 64
    assert info["tensor_types"] == {"Q8_0": 1, "F32": 1}
    assert info["tensor_bytes"] == 4 * 64 // 32 * 34 + 64 * 4


def test_read_gguf_header_refuses_other_files(tmp_path):
    from quantkit.ggufio import read_gguf_header

    (tmp_path / "x.gguf").write_bytes(b"NOPE" + bytes(32))
    with pytest.raises(QuantkitError, match="not a GGUF file"):
        read_gguf_header(tmp_path / "x.gguf")


# -- AWQ/GPTQ table -------------------------------------------------------------------------------------------

def test_hf_rules_are_one_table():
    assert HF_METHODS["awq"].bits == (4,) and HF_METHODS["gptq"].bits == (4, 8)
    assert set(HF_FORMATS) == {"classic", "compressed-tensors"}
    assert hf_param_problems("gptq", bits=8, group_size=128, fmt="classic") == {}
    assert set(hf_param_problems("awq", bits=8, group_size=100, fmt="gguf")) == {"bits", "group_size", "format"}
    for ok in (-1, 16, 32, 64, 128, 1024):
        assert group_size_problem(ok) is None
    for bad in (0, 8, 100, 96, -2, True):
        assert group_size_problem(bad)


def test_cli_choices_read_the_table(run_cli):
    code, out, _ = run_cli("gptq", "--help")
    assert code == 0 and "[4|8]" in out and "compressed-tensors" in out
    code, out, _ = run_cli("awq", "--help")
    assert code == 0 and "[4]" in out


def test_quantiser_check_params_uses_the_table():
    from quantkit.hfquant import check_params

    with pytest.raises(QuantkitError, match="--group-size must be a power of two >= 16"):
        check_params("gptq", bits=4, group_size=100, fmt="classic", samples=1, seq_len=16)
    with pytest.raises(QuantkitError, match="--bits must be one of 4 for AWQ"):
        check_params("awq", bits=8, group_size=128, fmt="classic", samples=1, seq_len=16)


@pytest.mark.parametrize("entry, field, message", [
    ("{method: awq, group_size: 100}", "group_size", "power of two"),
    ("{method: gptq, group_size: 8}", "group_size", "power of two"),
    ("{method: gptq, bits: 3}", "bits", "one of 4, 8"),
    ("{method: awq, format: exl2}", "format", "one of classic, compressed-tensors"),
    ("{method: awq, sym: true}", "sym", "unknown key"),  # AWQ has no sym option (always asymmetric)
])
def test_recipe_check_applies_the_quantisers_rules(entry, field, message):
    with pytest.raises(RecipeError, match=rf"variants\[0\]\.{field}: .*{message}"):
        parse_recipe(RECIPE + f"  - {entry}\n")


def test_recipe_check_cli_refuses_group_size_100(tmp_path, run_cli):
    p = tmp_path / "r.yaml"
    p.write_text(RECIPE + "  - method: awq\n    group_size: 100\n")
    code, out, err = run_cli("recipe", "check", p)
    assert code == 2 and f"{p}:5: variants[0].group_size: must be a power of two" in err


def test_group_size_width_check_from_config_alone():
    from quantkit.plan import plan_from_config

    p = plan_from_config(json.loads((DATA / "qwen2.5-7b-instruct.config.json").read_text()))
    p.check_group_size(128)
    p.check_group_size(-1)
    with pytest.raises(QuantkitError, match="does not divide the input width 3584 of a layer.*use --group-size 512"):
        p.check_group_size(1024)
    with pytest.raises(QuantkitError, match="does not divide"):
        p.check_machine("awq", group_sizes={1024})
    assert "linear_widths" not in p.to_json()


def test_group_size_width_check_from_headers():
    from quantkit.plan import plan_from_config

    config = json.loads((DATA / "llama-3.1-8b.config.json").read_text())
    tensors = {"model.layers.0.mlp.down_proj.weight": ("BF16", [4096, 96]),
               "model.layers.0.self_attn.q_proj.weight": ("BF16", [4096, 4096])}
    p = plan_from_config(config, tensors=tensors)
    p.check_group_size(32)
    with pytest.raises(QuantkitError, match="input width 96 of model.layers.0.mlp.down_proj.weight"):
        p.check_group_size(64)


# -- gates' fractions ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, kw, message", [
    ("-5%", {}, "must not be negative"),
    ("-0.05", {}, "must not be negative"),
    ("150%", {"maximum": 1}, "is above 1"),
    ("3", {}, "ambiguous"),
])
def test_parse_fraction_range_applies_to_percentages(value, kw, message):
    from quantkit.evaluate import parse_fraction

    with pytest.raises(QuantkitError, match=message):
        parse_fraction(value, "--x", **kw)


def test_parse_fraction_values():
    from quantkit.evaluate import parse_fraction

    assert parse_fraction("150%", "--max-ppl-increase") == pytest.approx(1.5)  # a 150% rise is a valid limit
    assert parse_fraction("90%", "--min-top1", maximum=1) == pytest.approx(0.9)
    assert parse_fraction(0.05, "x") == 0.05 and parse_fraction("", "x") is None


def test_recipe_min_top1_percentage_above_100(tmp_path):
    with pytest.raises(RecipeError, match="eval.min_top1: .*is above 1"):
        parse_recipe(RECIPE + "  - {method: gguf, types: [Q8_0]}\neval: {min_top1: 150%}\n")


# -- bare command, threads -----------------------------------------------------------------------------------------

def test_bare_quantkit_prints_help_and_exits_0(run_cli):
    code, out, err = run_cli()
    assert code == 0 and "Usage: quantkit" in out and "Commands:" in out
    assert "Error:" not in out + err and not err.strip()
    code, out, err = run_cli("recipe")
    assert code == 0 and "Usage: quantkit recipe" in out and "Error:" not in out + err and not err.strip()


def test_default_threads_honours_env_and_affinity(monkeypatch):
    import os

    from quantkit.util import default_threads

    monkeypatch.setenv("QUANTKIT_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.delenv("QUANTKIT_THREADS")
    assert default_threads() == len(os.sched_getaffinity(0))


def test_gptqmodel_workers_follow_quantkit_threads(monkeypatch):
    import os

    from quantkit.hfquant import engine_env_defaults

    monkeypatch.delenv("GPTQMODEL_CPU_WORKERS", raising=False)
    monkeypatch.setenv("QUANTKIT_THREADS", "9")
    engine_env_defaults()
    assert os.environ["GPTQMODEL_CPU_WORKERS"] == "5"  # (9 + 1) // 2, from QUANTKIT_THREADS not os.cpu_count()
