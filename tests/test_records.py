"""Stage records and the gates table (fast: no model, no llama.cpp): the JSON round trip of every record, unknown
keys kept, the one gates table as evaluate/pipeline/report use it, and the pipeline's stage keys."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from quantkit.records import (
    GATE_BY_KEY,
    GATES,
    BenchScore,
    EvalScore,
    PushResult,
    QuantResult,
    VariantResult,
    VerifyResult,
)

pytestmark = pytest.mark.unit  # records, gates and keys: no model, no llama.cpp

PKG = Path(__file__).parent.parent / "quantkit"

# what evaluate.py / bench.py write into quantkit.json today (tests/test_evaluate.py, test_bench.py check them)
EVAL_ROW = {"name": "Q4_K_M", "kind": "gguf", "engine_short": "llama.cpp", "ppl": 12.5, "base_ppl": 12.0,
            "ppl_ratio": 12.5 / 12.0, "delta_ppl": 0.5, "ppl_ratio_se": 0.002, "kld_mean": 0.0123, "kld_se": 0.0004,
            "kld_p99": 0.11, "top1": 0.93, "tokens": 2048, "windows": 4, "ctx": 512, "engine": "llama.cpp b1",
            "tokenizer_match": True, "tokens_per_second": 410.0, "size": 1234567, "gates": {"kld_mean": True}}
EVAL_CTX = {"text": "builtin:eval", "text_sha256": "ab" * 32, "time": "2026-12-01T00:00:00Z"}
BENCH_ROW = {"name": "Q4_K_M", "engine": "llama.cpp b1 (cpu)", "device": "cpu", "pp_tps": 900.0, "pp_tps_std": 3.0,
             "tg_tps": 80.0, "tg_tps_std": 1.0, "size": 1234567, "bits_per_weight": 4.89, "peak_memory": 2_000_000,
             "peak_gpu_memory": None, "pp_gain": 2.0, "tg_gain": 3.0, "size_gain": 3.5}
BENCH_CTX = {"prompt_tokens": 16, "gen_tokens": 8, "repeats": 1, "threads": 2, "hardware": {"cpu": "x"},
             "time": "2026-12-01T00:00:00Z"}
BASE_ROW = {"name": "base", "engine": "transformers", "pp_tps": 450.0, "tg_tps": 26.0, "size": 4_000_000,
            "peak_memory": 5_000_000}


@pytest.mark.parametrize("cls,data", [
    (EvalScore, EvalScore.from_row(EVAL_ROW, EVAL_CTX).to_json()),
    (BenchScore, BenchScore.from_row(BENCH_ROW, BENCH_CTX, BASE_ROW).to_json()),
    (VerifyResult, {"passed": True, "engine": "llama.cpp", "tokens": 256, "kld": 0.01, "top1": 0.95, "bits": 4,
                    "bound": 0.75, "expected": 0.3, "seconds": 6.5, "error": None, "skipped": False,
                    "time": "2026-12-01T00:00:00Z"}),
    (PushResult, {"repo": "a/b", "url": "http://hub/a/b", "commit": "c" * 40, "revision": "main", "pr_url": None}),
    (QuantResult, {"method": "gguf", "type": "Q4_K_M", "path": "m.gguf", "size": 10, "bits_per_weight": 4.9,
                   "files": [{"path": "m.gguf", "size": 10, "sha256": "d" * 64}]}),
])
def test_record_round_trip_keeps_every_key(cls, data):
    data = {**data, "written_by_a_newer_quantkit": {"x": [1, 2]}}
    rec = cls.from_json(json.loads(json.dumps(data)))
    assert rec.extra["written_by_a_newer_quantkit"] == {"x": [1, 2]}
    assert rec.to_json() == data
    assert cls.from_json(rec.to_json()) == rec
    assert cls.from_json(None) is None and cls.from_json({}) is None


def test_eval_and_bench_records_map_the_stage_rows():
    e = EvalScore.from_row(EVAL_ROW, EVAL_CTX)
    assert (e.kld_mean, e.top1, e.size, e.text, e.gates) == (0.0123, 0.93, 1234567, "builtin:eval", {"kld_mean": True})
    assert e.ppl_increase == pytest.approx(0.5 / 12.0)
    assert "name" not in e.to_json() and not e.extra  # the row's display fields are not the score's
    b = BenchScore.from_row(BENCH_ROW, BENCH_CTX, BASE_ROW)
    assert (b.tg_tps, b.peak_memory, b.threads, b.base["tg_tps"]) == (80.0, 2_000_000, 2, 26.0)
    assert BenchScore.from_row(BENCH_ROW, BENCH_CTX, None).base is None


def test_variant_tokens_per_second_prefers_the_benchmark():
    v = VariantResult("Q4_K_M", "gguf", "f", None, eval=EvalScore(tokens_per_second=410.0))
    assert v.tokens_per_second == 410.0
    v.bench = BenchScore(tg_tps=80.0)
    assert v.tokens_per_second == 80.0
    d = v.to_json()
    assert d["bench"]["tg_tps"] == 80.0 and d["eval"]["tokens_per_second"] == 410.0
    json.dumps(d)


def test_gates_table():
    assert [g.name for g in GATES] == ["max_kld", "max_ppl_increase", "min_top1"]
    kld, ppl, top1 = (GATE_BY_KEY[k] for k in ("kld_mean", "ppl_increase", "top1"))
    score = EvalScore.from_row(EVAL_ROW, EVAL_CTX)
    assert kld.passes(kld.value(score), 0.05) and not kld.passes(kld.value(score), 0.01)
    assert ppl.value(score) == pytest.approx(0.5 / 12.0) and not ppl.passes(ppl.value(score), 0.03)
    assert top1.passes(top1.value(score), 0.9) and not top1.passes(top1.value(score), 0.95)
    assert kld.value(None) is None and ppl.value(EvalScore()) is None
    # how the report, the eval table and the eval failure line show them
    assert [g.rule(lim) for g, lim in zip(GATES, (0.05, 0.03, 0.9))] == ["KLD <= 0.05", "PPL increase <= 3%",
                                                                        "top-1 >= 90%"]
    assert (kld.shown(0.0123), ppl.shown(0.0417), top1.shown(0.93)) == ("0.01230", "+4.17%", "93.00%")
    assert (kld.op, top1.op, ppl.flag) == (">", "<", "--max-ppl-increase")


def test_the_gates_are_the_recipe_and_evaluate_fields():
    import inspect

    from quantkit.evaluate import evaluate
    from quantkit.recipe import Eval

    fields = set(Eval.__dataclass_fields__)
    params = set(inspect.signature(evaluate).parameters)
    for g in GATES:
        assert g.name in fields and g.name in params, g.name


def test_report_does_not_import_the_pipeline():
    code = "import sys, quantkit.report, quantkit.card, quantkit.evaluate; print('quantkit.pipeline' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_no_keyboard_interrupt_reraise_clauses():
    """``except KeyboardInterrupt: raise`` before ``except Exception`` does nothing (not an Exception)."""
    found = []
    for f in sorted(PKG.glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ExceptHandler) and isinstance(node.type, ast.Name) \
                    and node.type.id == "KeyboardInterrupt" and [type(s) for s in node.body] == [ast.Raise]:
                found.append(f"{f.name}:{node.lineno}")
    assert not found, found


def _recipe(tmp_path, publish_extra=""):
    p = tmp_path / "recipe.yaml"
    p.write_text(f"""\
quantkit: 1
model: some-org/Some-Model
out: {tmp_path / 'out'}
variants:
  - method: gguf
    types: [Q8_0]
publish:
  enabled: true
  repo: alice-org/{{model_name}}-{{method}}
{publish_extra}""")
    return p


@pytest.mark.parametrize("edit", ["  license: mit\n", "  license: apache-2.0\n", "  private: false\n",
                                  "  accept_license_terms: true\n"])
def test_publish_edits_change_the_card_and_push_keys(tmp_path, edit):
    from quantkit.pipeline import Pipeline
    from quantkit.recipe import load_recipe

    def keys(extra, push=True):
        p = Pipeline(load_recipe(_recipe(tmp_path, extra)), push=push)
        folder = p.variants[0].folder
        card = p._card_key(folder)
        return card, p._push_key(folder, card)

    card0, push0 = keys("")
    card1, push1 = keys(edit)
    assert push1 != push0
    if "license" in edit and "terms" not in edit:  # the licence is written into the card
        assert card1 != card0
    assert keys("")[0] != keys("", push=False)[0]  # the card names the repo only when it is pushed
