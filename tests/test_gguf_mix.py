"""Measured per-tensor GGUF mixes (``--types auto:Q4_K_M``): spec parsing, the budgeted allocation, and a real
tiny-model run (size within the preset's, loads in llama.cpp, recorded, reproducible); SmolLM2 in the slow set."""

from __future__ import annotations

import numpy as np
import pytest

from quantkit.errors import QuantkitError
from quantkit.formats import parse_auto
from quantkit.gguf_mix import (
    allocate,
    category,
    fit_scales,
    layer_bins,
    layer_of,
    split_calibration,
    summary,
    tensor_scales,
)
from quantkit.recipe import parse_recipe

# -- unit: no model, no llama.cpp ------------------------------------------------------------------

@pytest.mark.unit
def test_parse_auto_specs():
    assert parse_auto("auto:q4_k_m").name == "auto:Q4_K_M"
    assert parse_auto("auto:Q4_K").preset == "Q4_K_M"           # alias
    assert parse_auto("auto:4.5bpw").bpw == 4.5
    assert parse_auto("auto:3.2GB").size == 3_200_000_000
    assert parse_auto("auto:90MB").name == "auto:90MB"
    assert parse_auto("auto:1GiB").size == 1 << 30
    for n in (12_803_744, 3_214_567_891, 500_001):  # a size budget's label parses back to the same bytes
        assert parse_auto(parse_auto(f"auto:{n / 1e6:.6f}MB").name).size == n
    for bad in ("auto:", "auto:Q4_K_X", "auto:IQ4_XS", "auto:0bpw", "auto:12bpw", "auto:3.2XB"):
        with pytest.raises(QuantkitError, match="auto:PRESET") as e:
            parse_auto(bad)
        assert "\n" not in str(e.value)


@pytest.mark.unit
def test_bad_auto_spec_is_one_line_from_the_cli(run_cli, tmp_path):
    code, out, err = run_cli("gguf", str(tmp_path / "nowhere"), "--types", "Q4_K_M,auto:Q4_K_Z")
    assert code != 0 and out == ""
    assert "auto:Q4_K_Z" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def _table(**tensors):
    """{name: [(type, bytes, err), ...]} -> a sensitivity table as gguf_mix.sensitivities returns it."""
    return {"tensors": {n: {t: {"type": t, "bytes": b, "err": e} for t, b, e in opts}
                        for n, opts in tensors.items()}}


@pytest.mark.unit
def test_allocation_spends_bytes_where_error_per_byte_is_largest():
    opts = lambda big: [("Q4_0", 320, 10.0 * big), ("Q5_0", 384, 4.0 * big), ("Q8_0", 544, 0.5 * big)]  # noqa: E731
    table = _table(sensitive=opts(100), robust=opts(1), fixed=[("F32", 64, 0.0)])
    header = 1000
    cheapest = header + 320 + 320 + 64
    # room for exactly one 64-byte upgrade: it goes to the sensitive tensor
    assign, size = allocate(table, cheapest + 64, header)
    assert assign == {"sensitive": "Q5_0", "robust": "Q4_0", "fixed": "F32"} and size == cheapest + 64
    # everything fits: the best type everywhere
    assign, size = allocate(table, 10_000, header)
    assert assign["sensitive"] == assign["robust"] == "Q8_0" and size == header + 544 * 2 + 64
    # nothing fits
    assert allocate(table, cheapest - 1, header)[0] is None
    # dominated options (more bytes, more error) are never chosen
    t2 = _table(x=[("A", 320, 5.0), ("B", 400, 6.0), ("C", 480, 1.0)])
    assert allocate(t2, 10_000, 0)[0] == {"x": "C"} and allocate(t2, 460, 0)[0] == {"x": "A"}


@pytest.mark.unit
def test_layer_gains_send_bytes_to_the_layer_that_costs_more_kld():
    """Two tensors of one category with the same proxy: the measured gain of layer 0 (10x) decides the upgrade."""
    opts = [("Q4_0", 320, 10.0), ("Q8_0", 544, 0.5)]
    table = _table(**{"blk.0.ffn_down.weight": opts, "blk.1.ffn_down.weight": opts})
    table["categories"] = {"ffn_down": {"scale": 2.0}}
    table["layers"] = {"0": {"layers": [0], "gain": 10.0}, "1": {"layers": [1], "gain": 1.0}}
    assert tensor_scales(table) == {"blk.0.ffn_down.weight": 20.0, "blk.1.ffn_down.weight": 2.0}
    assign, _ = allocate(table, 320 + 544, 0)
    assert assign == {"blk.0.ffn_down.weight": "Q8_0", "blk.1.ffn_down.weight": "Q4_0"}
    table["layers"] = {"0": {"layers": [0], "gain": 1.0}, "1": {"layers": [1], "gain": 10.0}}
    assert allocate(table, 320 + 544, 0)[0] == {"blk.0.ffn_down.weight": "Q4_0", "blk.1.ffn_down.weight": "Q8_0"}


@pytest.mark.unit
def test_the_category_times_layer_fit_reproduces_every_probe():
    """Probe increases made by a known scale(category) x gain(layer) are fitted back exactly; bins share a probe."""
    rng = np.random.default_rng(0)
    true_scale = {c: float(rng.uniform(1e-5, 1e-3)) for c in ("attn_q", "attn_v", "ffn_down")}
    true_gain = {g: float(rng.uniform(1, 20)) for g in range(6)}  # above GAIN_FLOOR x median
    proxy = {f"blk.{g}.{c}.weight": float(rng.uniform(10, 1000)) for g in true_gain for c in true_scale}
    proxy["token_embd.weight"] = 5.0
    cats = {c: [n for n in proxy if category(n) == c] for c in (*true_scale, "token_embd")}
    groups = {g: [n for n in proxy if layer_of(n) == g] for g in true_gain}
    true = {n: (true_scale.get(category(n)) or 0.01) * true_gain.get(layer_of(n), 1.0) * p for n, p in proxy.items()}
    inc = {("category", c): sum(true[n] for n in names) for c, names in cats.items()}
    inc |= {("layer", g): sum(true[n] for n in names) for g, names in groups.items()}
    scale, gain = fit_scales(proxy, cats, groups, inc)
    for n in proxy:
        fitted = scale[category(n)] * gain.get(layer_of(n), 1.0) * proxy[n]
        assert fitted == pytest.approx(true[n], rel=1e-3), n
    assert layer_bins(list(range(30))) == {i: i * 32 // 30 for i in range(30)}  # one probe per layer
    assert sorted(set(layer_bins(list(range(80))).values())) == list(range(32))  # 80 layers: 32 probes


@pytest.mark.unit
def test_the_check_is_scored_on_calibration_samples_the_probes_never_saw():
    texts = [f"sample {i}" for i in range(5)]
    probe, check, label = split_calibration(texts)
    assert probe == "sample 0\n\nsample 1" and check == "sample 2\n\nsample 3\n\nsample 4"
    assert "\n\n".join(texts).startswith(probe)  # the probes' tokens start where they always did: tables stay valid
    assert "not the probes' tokens" in label
    probe, check, label = split_calibration(["only one"])
    assert probe == check == "only one" and "own tokens" in label
    # a half too short for one check window: the whole text for both (a short user file still works)
    probe, check, label = split_calibration(texts, count=lambda t: len(t.split()), need=5)
    assert probe == check == "\n\n".join(texts) and "too little text" in label
    assert split_calibration(texts, count=lambda t: len(t.split()), need=4)[1] == "sample 2\n\nsample 3\n\nsample 4"


@pytest.mark.unit
def test_recipes_accept_auto_types_with_an_imatrix():
    text = ("quantkit: 1\nmodel: org/m\nvariants:\n  - method: gguf\n    types: [Q4_K_M, auto:Q4_K_M]\n"
            "    imatrix: {imx}\n")
    r = parse_recipe(text.format(imx="true"))
    assert r.variant_names() == ["Q4_K_M", "auto:Q4_K_M"]
    with pytest.raises(QuantkitError, match="auto:Q4_K_M needs an importance matrix"):
        parse_recipe(text.format(imx="false"))
    with pytest.raises(QuantkitError, match="auto:PRESET"):
        parse_recipe(text.format(imx="true").replace("auto:Q4_K_M]", "auto:lots]"))


@pytest.mark.unit
def test_weighted_error_matches_the_direct_sum(tmp_path):
    """The proxy read back from GGUF files (row sample, scaled) equals sum_j imatrix_j * sum_i dW_ij^2."""
    import gguf
    import numpy as np
    from gguf.quants import dequantize, quantize

    from quantkit.gguf_mix import _weighted_error

    rng = np.random.default_rng(0)
    w = rng.standard_normal((300, 64)).astype(np.float32)  # 300 rows > SAMPLE_ROWS: the sample is scaled up
    q8 = gguf.GGMLQuantizationType.Q8_0
    readers = {}
    for name, data, raw in (("ref", w, None), ("q", quantize(w, q8), q8)):
        wr = gguf.GGUFWriter(str(tmp_path / f"{name}.gguf"), "llama")
        wr.add_tensor("t", data, raw_dtype=raw)
        wr.write_header_to_file()
        wr.write_kv_data_to_file()
        wr.write_tensors_to_file()
        wr.close()
        readers[name] = gguf.GGUFReader(str(tmp_path / f"{name}.gguf")).tensors[0]
    d2 = (w.astype(np.float64) - dequantize(quantize(w, q8), q8)) ** 2
    imx = rng.random(64).astype(np.float32)
    assert _weighted_error(readers["ref"], readers["q"], imx) == pytest.approx(float((d2 * imx).sum()), rel=0.03)
    assert _weighted_error(readers["ref"], readers["q"], None) == pytest.approx(d2.sum() / 300, rel=0.03)
    # quantkit's memory-mapped reader (no vocabulary parse) reads the same tensors as gguf-py's
    from quantkit.gguf_mix import read_tensors

    fast = {name: read_tensors(tmp_path / f"{name}.gguf")["t"] for name in readers}
    for name, t in fast.items():
        slow = readers[name]
        assert t.tensor_type == slow.tensor_type and tuple(t.shape) == tuple(int(x) for x in slow.shape)
        assert np.array_equal(np.asarray(t.data), np.asarray(slow.data).reshape(t.data.shape))
    assert _weighted_error(fast["ref"], fast["q"], imx) == _weighted_error(readers["ref"], readers["q"], imx)


@pytest.mark.unit
def test_summary_line():
    assert summary({"spec": "auto:Q4_K_M", "tensor_types": {"a": "Q4_K", "b": "Q6_K", "c": "Q4_K"}}) == \
        "quantkit mix at Q4_K_M size: 2 Q4_K, 1 Q6_K"
    assert "fell back to Q4_K_M" in summary({"spec": "auto:Q4_K_M", "fallback": "mix KLD 0.1 >= 0.09"})


# -- real runs ------------------------------------------------------------------------------------

def _run(model, out, calib, types=("Q4_K_M", "auto:Q4_K_M")):
    from quantkit.gguf import quantize_gguf

    return quantize_gguf(str(model), list(types), out, calibration=str(calib), threads=2)


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory, calibration_text):
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(calibration_text[:9000], encoding="utf-8")
    return p


def test_auto_mix_on_a_tiny_model(tiny_llama, calib_file, tmp_path, eval_text, monkeypatch):
    import llama_cpp

    from quantkit import gguf_mix
    from quantkit.gguf_mix import tensor_bytes
    from quantkit.ggufio import read_gguf_info
    from quantkit.util import sha256_file

    monkeypatch.setattr(gguf_mix, "CHECK_TOKENS", 512)  # one window per measurement keeps the default set quick

    res = _run(tiny_llama, tmp_path / "a", calib_file)
    preset, auto = (res.manifest.artifacts[a] for a in res.artifacts)
    assert auto["path"].endswith("-auto-Q4_K_M.gguf") and auto["type"] == "auto:Q4_K_M"
    assert auto["size"] <= preset["size"]
    mix = auto["mix"]
    # the record holds the per-tensor types actually in the file, the table's hash and the settings
    actual, _, _ = tensor_bytes(tmp_path / "a" / auto["path"])
    assert mix["tensor_types"] and all(actual[n][0] == t for n, t in mix["tensor_types"].items())
    assert len(mix["sensitivity"]["sha256"]) == 64 and mix["search"]["candidates"]
    # every layer was probed (its gain measured) beside every category
    layers = mix["sensitivity"]["layers"]
    assert sorted(x for v in layers.values() for x in v["layers"]) == sorted(
        {layer_of(n) for n in mix["tensor_types"] if layer_of(n) is not None})
    assert all(v["gain"] > 0 for v in layers.values()) and mix["sensitivity"]["categories"]
    assert mix["budget_bytes"] == preset["size"]
    assert mix["search"]["check"]["text"] == "calibration, second half (not the probes' tokens)"
    if mix["fallback"] is None:  # a real mix: it differs from the preset somewhere and was measured better
        assert mix["search"]["check"]["kld_mix"] < mix["search"]["check"]["kld_preset"]
        assert read_gguf_info(tmp_path / "a" / auto["path"])["tensor_types"] != preset["gguf"]["tensor_types"]
    else:
        assert auto["files"][0]["sha256"] == preset["files"][0]["sha256"]
    # loads and runs in llama.cpp
    llm = llama_cpp.Llama(str(tmp_path / "a" / auto["path"]), n_ctx=64, verbose=False)
    toks = llm.tokenize(eval_text[:200].encode())[:16]
    llm.eval(toks)
    assert llm.n_tokens == len(toks)
    del llm
    # deleted and made again, it re-uses the cached sensitivities and reproduces the same bytes; a size budget
    # (the preset's own file size) is compared with, and can fall back to, the largest preset whose file fits it
    (tmp_path / "a" / auto["path"]).unlink()
    size_spec = f"auto:{preset['size'] / 1e6:.6f}MB"
    again = _run(tiny_llama, tmp_path / "a", calib_file, types=("auto:Q4_K_M", size_spec))
    assert sorted(again.built) == sorted(again.artifacts)
    rec, by_size = (again.manifest.artifacts[a] for a in again.artifacts)
    assert rec["mix"]["sensitivity"]["reused"] and rec["mix"]["sensitivity"]["sha256"] == mix["sensitivity"]["sha256"]
    assert rec["files"][0]["sha256"] == auto["files"][0]["sha256"]
    assert sha256_file(tmp_path / "a" / rec["path"]) == auto["files"][0]["sha256"]
    sm = by_size["mix"]
    for r in (auto, by_size):  # every auto file was loaded in llama.cpp and scored against the base on build
        assert r["verify"]["passed"] and r["verify"]["engine"].startswith("llama.cpp") and r["verify"]["tokens"] >= 255
    assert sm["budget_bytes"] == preset["size"] and by_size["size"] <= preset["size"]
    assert sm["preset"] in ("Q4_K_M", "Q4_K_S", "Q3_K_L") and sm["file_type"] == sm["preset"]
    if sm["fallback"] is None:
        assert sm["search"]["check"]["preset"] == sm["preset"]
        assert sm["search"]["check"]["kld_mix"] < sm["search"]["check"]["kld_preset"]
    else:
        assert sm["fallback"].endswith("on the calibration text") and sm["preset"] in summary(sm)


def test_auto_mix_needs_calibration(tiny_llama, tmp_path):
    from quantkit.gguf import quantize_gguf

    with pytest.raises(QuantkitError, match="auto:Q4_K_M need an importance matrix"):
        quantize_gguf(str(tiny_llama), ["auto:Q4_K_M"], tmp_path)


@pytest.mark.slow
def test_smollm2_auto_beats_the_preset_on_the_continuous_model(smollm2_continuous, calib_file, tmp_path):
    """On the continuous SmolLM2 (not the gridded builtin, whose Q4_1 grid flatters a mix), on the held-out eval
    text and on prose quantkit never sees, at Q3_K_M, Q4_K_M and Q5_K_M size: never worse than the preset (a mix
    that is not better falls back to it), at least 10% lower mean KLD at Q3_K_M and Q4_K_M (the first goal), and
    the raised goal (at least 25% lower at all three, issue 22 item 5) reported as an expected failure while it
    is not met: benchmarks/gguf_mix.md measured 0.50 / 0.77 / 1.00 (Q5_K_M falls back) on the eval text. At Q5_K_M
    it is out of reach of llama.cpp's types on this model: the best whole-layer exchange measures 0.818, the best
    whole-kind one (measured per-kind moves, summed) 1.04, and the search's own model at its exact optimum
    promises 0.766 (benchmarks/mix_exchange.md, benchmarks/mix_allocator.md)."""
    from quantkit.evaluate import evaluate
    from quantkit.texts import held_out_texts

    budgets = ("Q3_K_M", "Q4_K_M", "Q5_K_M")
    res = _run(smollm2_continuous, tmp_path / "s", calib_file, types=[t for b in budgets for t in (b, f"auto:{b}")])
    paths = res.paths()
    missed = []
    for name, text, _ in held_out_texts():
        rep = evaluate(str(smollm2_continuous), [str(p) for p in paths], text=text, max_tokens=2048,
                       write_manifest=False)
        kld = [r["kld_mean"] for r in rep.rows]
        for i, b in enumerate(budgets):
            kld_preset, kld_auto = kld[2 * i], kld[2 * i + 1]
            ratio = kld_auto / kld_preset
            print(f"SmolLM2 (continuous, {name}) auto:{b} KLD {kld_auto:.4f} vs {b} {kld_preset:.4f} ({ratio:.3f})")
            assert paths[2 * i + 1].stat().st_size <= paths[2 * i].stat().st_size
            assert ratio <= 1.0 + 1e-9
            if b != "Q5_K_M":
                assert ratio <= 0.9  # the first goal: >= 10% lower mean KLD at no larger size
            if ratio > 0.75:
                missed.append(f"{b} {name} {ratio:.3f}")
    if missed:
        pytest.xfail("the raised goal (>= 25% lower KLD) is not met: " + ", ".join(missed))
