"""quantkit plan: parameter counts, KV cache and sizes against hand-computed values from published configs."""

import json
from pathlib import Path

import pytest

from quantkit.errors import QuantkitError
from quantkit.formats import GGUF_TYPES
from quantkit.plan import GB, GiB, params_from_config, plan, plan_from_config

DATA = Path(__file__).parent / "data"


def cfg(name):
    return json.loads((DATA / f"{name}.config.json").read_text())


# Hand computation, Llama-3.1-8B (hidden 4096, 32 layers, 32 heads / 8 KV x 128, MLP 14336, vocab 128256, untied):
#   per layer: q 4096*4096 + k,v 2*4096*1024 + o 4096*4096 = 41,943,040; MLP 3*4096*14336 = 176,160,768;
#   norms 2*4096 -> 218,112,000; x32 = 6,979,584,000; + embed and lm_head 2*128256*4096 = 1,050,673,152
#   + final norm 4096 = 8,030,261,248 (the published 8.03B).
# Llama-3.3-70B (8192, 80 layers, 64/8 heads, MLP 28672): layer 150,994,944 + 704,643,072 + 16,384 = 855,654,400;
#   x80 + 2*128256*8192 + 8192 = 70,553,706,496.
# Mixtral-8x22B (6144, 56 layers, 48/8 heads, 8 experts x MLP 16384, top-2, vocab 32000): attention 88,080,384,
#   experts 8*301,989,888, router 6144*8, norms 12,288 -> 2,504,060,928 per layer; x56 + 2*32000*6144 + 6144
#   = 140,620,634,112 total; active: layer 88,080,384 + 2*301,989,888 + 49,152 + 12,288 = 692,121,600,
#   x56 + 393,222,144 = 39,152,031,744.
# Qwen2.5-7B (3584, 28 layers, 28/4 heads, MLP 18944, vocab 152064, q/k/v biases 3584+2*512):
#   layer 29,360,128 + 4,608 + 203,685,888 + 7,168 = 233,057,792; x28 + 2*152064*3584 + 3584 = 7,615,616,512.
EXPECTED = {
    "llama-3.1-8b": dict(total=8_030_261_248, active=8_030_261_248, kv8k=2 * 32 * 8 * 128 * 8192 * 2),
    "llama-3.3-70b-instruct": dict(total=70_553_706_496, active=70_553_706_496, kv8k=2 * 80 * 8 * 128 * 8192 * 2),
    "mixtral-8x22b": dict(total=140_620_634_112, active=39_152_031_744, kv8k=2 * 56 * 8 * 128 * 8192 * 2),
    "qwen2.5-7b-instruct": dict(total=7_615_616_512, active=7_615_616_512, kv8k=2 * 28 * 4 * 128 * 8192 * 2),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.unit
def test_params_and_kv_from_published_configs(name):
    e = EXPECTED[name]
    p = plan_from_config(cfg(name), model=name, context=8192, batch=1)
    assert p.params_source == "config.json"
    assert p.params_total == e["total"]
    assert p.params_active == e["active"]
    assert p.kv_bytes == e["kv8k"]
    # FP16 = exactly two bytes per parameter
    assert p.row("FP16/BF16").weight_bytes == 2 * e["total"]
    # KV cache scales linearly with context and batch
    p2 = plan_from_config(cfg(name), context=4096, batch=4)
    assert p2.kv_bytes == 2 * e["kv8k"]


@pytest.mark.unit
def test_llama31_8b_kv_is_one_gib_at_8k():
    assert plan_from_config(cfg("llama-3.1-8b")).kv_bytes == GiB


@pytest.mark.unit
def test_int4_group_overhead_and_gguf_bpw():
    p = plan_from_config(cfg("llama-3.1-8b"))
    linear = p.params_linear
    assert linear == 32 * (41_943_040 + 176_160_768)
    rest = p.params_total - linear
    # INT4 g128: 4 bits + (16-bit scale + 4-bit zero) / 128 per weight on Linear layers, rest fp16
    assert p.row("INT4 AWQ/GPTQ g128").weight_bytes == int(linear * (4 + 20 / 128) / 8 + rest * 2)
    assert p.row("INT8 AWQ/GPTQ g128").weight_bytes == int(linear * (8 + 24 / 128) / 8 + rest * 2)
    # GGUF: ggml block sizes and llama.cpp's published Llama-3-8B sizes reproduce themselves
    bpw = {t: GGUF_TYPES[t].bits_per_weight()[0] for t in ("Q8_0", "Q6_K", "IQ4_XS", "Q4_K_M", "Q5_K_M")}
    assert bpw["Q8_0"] == 8.5 and bpw["Q6_K"] == 6.5625 and bpw["IQ4_XS"] == 4.25
    assert 4.8 <= bpw["Q4_K_M"] <= 4.95 and 5.5 <= bpw["Q5_K_M"] <= 5.75
    q4km = p.row("GGUF Q4_K_M").weight_bytes
    assert abs(q4km / GiB - 4.58) < 0.01  # quantize.cpp: "Q4_K_M 4.58G @ Llama-3-8B"
    assert abs(p.row("GGUF Q8_0").weight_bytes / GiB - 7.96) < 0.5


@pytest.mark.unit
def test_seed_table_magnitudes():
    """The seed's table: 7B ~ 14/8/5 GB (FP16/INT8/INT4), 70B ~ 140/80/40 GB."""
    q = plan_from_config(cfg("qwen2.5-7b-instruct"))
    l70 = plan_from_config(cfg("llama-3.3-70b-instruct"))
    for p, (fp16, int8, int4) in ((q, (14, 8, 5)), (l70, (140, 80, 40))):
        got = [p.row("FP16/BF16").weight_bytes / GB, p.row("INT8 AWQ/GPTQ g128").weight_bytes / GB,
               p.row("INT4 AWQ/GPTQ g128").weight_bytes / GB]
        for g, want in zip(got, (fp16, int8, int4)):
            assert want / 1.4 <= g <= want * 1.4, (p.model, got)


@pytest.mark.unit
def test_device_fits():
    l70 = plan_from_config(cfg("llama-3.3-70b-instruct"), context=8192)
    int4 = l70.row("INT4 AWQ/GPTQ g128")
    assert "A100 80GB" in int4.fits and "H100 80GB" in int4.fits
    assert "RTX 4090 24GB" not in int4.fits and "A100 40GB" not in int4.fits
    assert not any(f.startswith("Apple") for f in int4.fits)  # AWQ/GPTQ: NVIDIA kernels only
    fp16 = l70.row("FP16/BF16")
    # 141 GB of weights: no single NVIDIA GPU, only a 192 GB Mac (75% of it = 154.6 GB usable)
    assert fp16.fits == ["Apple M 192GB"]
    gguf = l70.row("GGUF Q4_K_M")
    assert "Apple M 64GB" in gguf.fits and "RTX 4090 24GB" not in gguf.fits
    small = plan_from_config(cfg("llama-3.1-8b"), context=8192)
    assert "RTX 4090 24GB" in small.row("FP16/BF16").fits


@pytest.mark.unit
def test_mixtral_moe_needs_total_memory():
    p = plan_from_config(cfg("mixtral-8x22b"))
    assert p.experts == 8 and p.experts_per_token == 2
    assert 270 * GB < p.row("FP16/BF16").weight_bytes < 290 * GB  # all experts are resident
    assert "MoE 8 experts / 2 active" in p.table() and "active GB/token" in p.table()
    # a token reads 2 of 8 experts: the published 39,152,031,744 active parameters, per format
    assert p.row("FP16/BF16").active_weight_bytes == 2 * 39_152_031_744
    int4, inactive = p.row("INT4 AWQ/GPTQ g128"), p.params_total - p.params_active
    rest = p.params_total - p.params_linear
    assert int4.active_weight_bytes == int((p.params_linear - inactive) * (4 + 20 / 128) / 8 + rest * 2)
    assert int4.active_weight_bytes < int4.weight_bytes / 3  # 4-bit experts: 20.9 GB of 73.6 GB per token
    assert plan_from_config(cfg("llama-3.1-8b")).row("FP16/BF16").active_weight_bytes is None  # dense: no column
    assert "active GB/token" not in plan_from_config(cfg("llama-3.1-8b")).table()


def test_headers_agree_with_config(tiny_llama, tiny_qwen2):
    for folder in (tiny_llama, tiny_qwen2):
        p = plan(str(folder), context=512)
        assert p.params_source == "safetensors headers"
        c = params_from_config(json.loads((folder / "config.json").read_text()))
        assert p.params_total == c["total"]
        assert p.params_linear == c["linear"]
        assert p.checkpoint_local and p.checkpoint_bytes > 0


def test_check_machine(tiny_llama):
    p = plan(str(tiny_llama))
    p.check_machine("gguf")  # tiny: fits anywhere
    big = plan_from_config(cfg("llama-3.3-70b-instruct"), model="meta-llama/Llama-3.3-70B-Instruct")
    with pytest.raises(QuantkitError, match="RAM|disk"):
        big.check_machine("awq")  # 141 GB of bf16 weights in RAM on this machine: no
    with pytest.raises(QuantkitError, match="unknown method"):
        p.check_machine("bogus")


def test_cli_plan(run_cli, tiny_llama):
    code, out, err = run_cli("plan", tiny_llama, "--context", "1024", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["context"] == 1024 and d["params_total"] > 0
    assert {r["name"] for r in d["rows"]} >= {"FP16/BF16", "GGUF Q4_K_M", "INT4 AWQ/GPTQ g128"}
    code, out, err = run_cli("plan", tiny_llama)
    assert code == 0 and "GGUF Q8_0" in out and "fits on" in out
    code, out, err = run_cli("plan", "/nonexistent/folder")
    assert code == 2 and err.count("\n") == 1 and "error:" in err


def test_plan_hub_id_reads_headers_not_weights(hub_server, tiny_llama):
    """A Hub id: config.json + safetensors headers over HTTP (local Hub), no weight download."""
    hub_server.seed("alice/tiny", folder=tiny_llama)
    p = plan("alice/tiny", context=1024)
    assert p.params_source == "safetensors headers"
    assert p.params_total == params_from_config(json.loads((tiny_llama / "config.json").read_text()))["total"]
    assert not p.checkpoint_local and p.checkpoint_bytes > 0
    assert p.needs["gguf"].disk_bytes > p.checkpoint_bytes  # the download counts when it is a Hub id
    hub_cache = hub_server.hf_home / "hub"
    assert not (hub_cache.exists() and list(hub_cache.rglob("*.safetensors")))  # no weights downloaded
