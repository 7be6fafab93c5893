"""quantkit bench on SmolLM2-135M: a real GGUF in llama.cpp and the base in transformers, each in its own
process. Tiny sizes (speed numbers are not asserted, only that they were measured and recorded)."""

from __future__ import annotations

import json

from eval_fixtures import gguf_path, smollm2_gguf_set  # noqa: F401 (fixture)

THREADS = 1


def test_bench_gguf_vs_base_records_results(smollm2_hf, smollm2_gguf_set):
    from quantkit.bench import bench

    q4 = gguf_path(smollm2_gguf_set, "Q4_K_M")
    # base=None: taken from the variant's quantkit.json (base.local_path is the smollm2_hf folder)
    rep = bench([str(q4)], prompt_tokens=32, gen_tokens=8, repeats=2, threads=THREADS)
    assert rep.base is not None and rep.base["engine"].startswith("transformers")
    assert rep.base["bits_per_weight"] == 32.0
    (r,) = rep.rows
    assert r["engine"].startswith("llama.cpp") and r["device"] == "cpu"
    assert len(r["pp_runs"]) == 2 and len(r["tg_runs"]) == 2
    assert r["pp_tps"] > 0 and r["tg_tps"] > 0 and r["pp_tps_std"] >= 0
    assert 4.5 < r["bits_per_weight"] < 7.5
    assert r["size"] == q4.stat().st_size and r["size_gain"] > 3
    assert r["peak_memory"] > r["size"] // 2 and rep.base["peak_memory"] > r["peak_memory"]
    assert r["pp_gain"] == r["pp_tps"] / rep.base["pp_tps"]
    hw = rep.context["hardware"]
    assert hw["cpu"] and hw["threads"] == THREADS
    assert "±" in rep.table() and "(base)" in rep.table()
    data = json.loads((smollm2_gguf_set / "quantkit.json").read_text())
    b = data["artifacts"][r["artifact"]]["bench"]
    assert b["tg_tps"] == r["tg_tps"] and b["base"]["name"] == rep.base["name"] and b["hardware"]["cpu"]
    assert b["prompt_tokens"] == 32 and b["gen_tokens"] == 8 and b["repeats"] == 2


def test_bench_cli_json_without_base(run_cli, smollm2_gguf_set):
    q8 = gguf_path(smollm2_gguf_set, "Q8_0")
    code, out, err = run_cli("bench", q8, "--no-base", "--prompt-tokens", 16, "--gen-tokens", 4, "--repeats", 1,
                             "--threads", THREADS, "--json", "--no-write")
    assert code == 0, err
    data = json.loads(out)
    assert data["base"] is None
    (r,) = data["variants"]
    assert r["tg_tps"] > 0 and r["tg_tps_std"] == 0 and "pp_gain" not in r
    assert 8 < r["bits_per_weight"] < 9.5


def test_bench_user_error(run_cli, tmp_path):
    code, out, err = run_cli("bench", tmp_path / "nope.gguf")
    assert code == 2 and "does not exist" in err and "Traceback" not in err
