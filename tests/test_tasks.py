"""quantkit eval --tasks: lm-eval task scores and recovery, each variant scored by its own engine (offline).

The tasks are examples/own-eval/own_eval.yaml (50 self-written multiple-choice questions) and
examples/own-gsm/own_gsm.yaml (50 word problems, a generation task), read from local JSONL files (CC0). Default
run: a tiny random 2-layer Llama and its Q8_0/Q2_K GGUFs (mechanics: llama.cpp's numbers, exact self-recovery,
gate, manifest, errors, generation's stops and requests). Slow: SmolLM2-135M base vs its Q8_0/Q2_K GGUFs
(quality ordering, on both tasks).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
from eval_fixtures import build_gguf_set, gguf_path, smollm2_gguf_set  # noqa: F401 (fixture)
from test_pipeline import converted_tiny  # noqa: F401 (fixture)

pytest.importorskip("lm_eval")

TASK_YAML = Path(__file__).resolve().parents[1] / "examples" / "own-eval" / "own_eval.yaml"
TASK = "own_eval_mc"
THREADS = 1
LIMIT = 12

REQUESTS = [  # (context, continuation): shared contexts exercise the adapter's KV prefix reuse
    ("Question: What is the capital of France?\nAnswer:", " Paris"),
    ("Question: What is the capital of France?\nAnswer:", " Berlin"),
    ("Question: What is the capital of France?\nAnswer:", " a large city in Europe"),
    ("Question: What is 2 + 2?\nAnswer:", " 4"),
    ("The quick brown fox", " jumps over the lazy dog."),
    ("def add(a, b):\n    return", " a + b"),
]


@pytest.fixture(scope="module")
def tiny_gguf_set(tiny_llama) -> Path:
    return build_gguf_set(tiny_llama, name="tiny-llama-tasks-gguf", types=["Q8_0", "Q2_K"])


def llama_cpp_scores(path: Path, requests, add_bos: bool):
    """llama.cpp's own log-likelihood of each continuation, computed here without quantkit: tokenise with its
    tokenizer, evaluate context + continuation from an empty cache, sum the continuation's log-softmax."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=256, n_batch=256, logits_all=True, n_threads=THREADS, verbose=False)
    out = []
    for ctx, cont in requests:
        whole = llm.tokenize((ctx + cont).encode(), add_bos=add_bos, special=True)
        n_ctx = len(llm.tokenize(ctx.encode(), add_bos=add_bos, special=True))
        target = whole[n_ctx:]
        llm.reset()
        llm.eval(whole[:-1])
        logits = np.array(llm.scores[n_ctx - 1:len(whole) - 1], dtype=np.float64)
        m = logits.max(-1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
        out.append((float(sum(logp[i, t] for i, t in enumerate(target))),
                    bool(all(logits[i].argmax() == t for i, t in enumerate(target)))))
    llm.close()
    return out


def adapter_scores(path: Path, tokenizer, requests):
    from quantkit import engines

    lm = engines.get("llama.cpp").task_lm(path, base_tokenizer=tokenizer, base_path=None, max_length=256,
                                          threads=THREADS)
    try:
        return lm.loglikelihood([SimpleNamespace(args=r) for r in requests], disable_tqdm=True)
    finally:
        lm.close()


def _check_equal_to_llama_cpp(gguf: Path, hf_folder: Path):
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_folder)
    add_bos = len(tok("x").input_ids) > len(tok("x", add_special_tokens=False).input_ids)
    vocab = Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    for ctx, cont in REQUESTS:  # the base tokenizer and llama.cpp's give the same ids on these strings
        assert tok(ctx + cont).input_ids == vocab.tokenize((ctx + cont).encode(), add_bos=add_bos, special=True)
    vocab.close()
    ref = llama_cpp_scores(gguf, REQUESTS, add_bos)
    for got in (adapter_scores(gguf, tok, REQUESTS), adapter_scores(gguf, None, REQUESTS)):
        for (ll, greedy), (ll_ref, greedy_ref) in zip(got, ref):
            assert ll < 0 and ll == pytest.approx(ll_ref, abs=2e-3, rel=1e-4)
            assert greedy == greedy_ref
    return ref


def test_gguf_loglikelihoods_equal_llama_cpp(tiny_gguf_set, tiny_llama):
    ref = _check_equal_to_llama_cpp(gguf_path(tiny_gguf_set, "Q2_K"), tiny_llama)
    assert len({round(ll, 3) for ll, _ in ref}) == len(ref)  # distinct numbers, not a constant


@pytest.fixture(scope="module")
def tiny_gptq(tiny_llama, tmp_path_factory) -> Path:
    from quantkit.gptq import quantize_gptq

    out = tmp_path_factory.mktemp("tasks-gptq") / "gptq"
    return quantize_gptq(str(tiny_llama), fmt="classic", out=out, samples=4, seq_len=64, group_size=32,
                         device="cpu").folder


@pytest.fixture(scope="module")
def tiny_report(tiny_llama, tiny_gguf_set, tiny_gptq):
    from quantkit.tasks import eval_tasks

    # the base itself as a variant (transformers), the two GGUFs (llama.cpp) and a GPTQ folder (transformers);
    # a recovery gate too: every variant, not only the first, must still get `limit` documents (a gate once
    # overwrote the limit, and the variants after the first were scored on a fraction of the task)
    return eval_tasks(str(tiny_llama), [str(tiny_llama), str(tiny_gguf_set), str(tiny_gptq)], str(TASK_YAML),
                      limit=LIMIT, threads=THREADS, min_recovery="1%")


def _row(rep, variant):
    (r,) = [r for r in rep.rows if r["variant"] == variant]
    return r


def test_recovery_rows_and_self_recovery_is_exactly_one(tiny_report, tiny_llama):
    rep = tiny_report
    b = rep.base["tasks"][TASK]
    assert b["n"] == LIMIT and b["shots"] == 0 and b["metric"] == "acc_norm" and 0 < b["score"] <= 1
    assert b["stderr"] == pytest.approx(math.sqrt(b["score"] * (1 - b["score"]) / (LIMIT - 1)), rel=1e-6)
    self_row = _row(rep, tiny_llama.name)
    assert self_row["engine"].startswith("transformers")
    assert self_row["score"] == b["score"] and self_row["recovery"] == 1.0 and self_row["recovery_se"] == 0.0
    for t in ("Q8_0", "Q2_K"):
        r = next(r for r in rep.rows if r["type"] == t)
        assert r["engine"].startswith("llama.cpp") and r["engine_short"] == "llama.cpp"
        assert r["requests_sha256"] == b["requests_sha256"] and r["n"] == LIMIT
        assert r["recovery"] == pytest.approx(r["score"] / b["score"])
        assert r["recovery_se"] is not None and r["recovery_se"] >= 0
    (g,) = [r for r in rep.rows if r["format"] == "gptq"]
    assert g["engine_short"] == "transformers" and g["engine"].startswith("transformers")
    assert g["requests_sha256"] == b["requests_sha256"] and g["n"] == LIMIT
    assert g["recovery"] == pytest.approx(g["score"] / b["score"]) and all(r["gates"]["recovery"] for r in rep.rows)
    assert rep.context["limit"] == LIMIT and len(rep.rows) == 4
    table = rep.table()
    assert TASK in table and "recovery" in table and "llama.cpp" in table
    out = rep.to_json()
    json.dumps(out)
    assert {r["variant"] for r in out["tasks"]} == {r["variant"] for r in rep.rows} and out["passed"]


def test_results_written_into_quantkit_json(tiny_report, tiny_gguf_set):
    data = json.loads((tiny_gguf_set / "quantkit.json").read_text())
    for rec in data["artifacts"].values():
        t = rec["tasks"][TASK]
        row = next(r for r in tiny_report.rows if r["type"] == rec["type"])
        assert t["score"] == row["score"] and t["recovery"] == row["recovery"] and t["limit"] == LIMIT
        assert t["requests_sha256"] == tiny_report.base["tasks"][TASK]["requests_sha256"]
    assert data["history"][-1]["stage"] == "tasks"


def test_recovery_uncertainty():
    from quantkit.tasks import recovery

    base = {"score": 0.5, "stderr": 0.1, "higher_is_better": True, "per_doc": {0: 1.0, 1: 0.0, 2: 1.0, 3: 0.0}}
    var = {"score": 0.25, "stderr": 0.1, "higher_is_better": True, "per_doc": {0: 1.0, 1: 0.0, 2: 0.0, 3: 0.0}}
    r, se = recovery(base, var)
    # paired: d = var_i - 0.5 * base_i = [0.5, 0, -0.5, 0]; sd = sqrt(1/6); se = sd / (2 * 0.5)
    assert r == 0.5 and se == pytest.approx(math.sqrt(1 / 6) / 1.0)
    r2, se2 = recovery({**base, "per_doc": None}, {**var, "per_doc": None})  # independent propagation
    assert r2 == 0.5 and se2 == pytest.approx(0.5 * math.sqrt(0.4 ** 2 + 0.2 ** 2))
    ppl_b = {"score": 10.0, "stderr": None, "higher_is_better": False, "per_doc": None}
    assert recovery(ppl_b, {**ppl_b, "score": 12.5})[0] == pytest.approx(0.8)  # lower is better: base / variant
    assert recovery({**base, "score": 0.0}, var) == (None, None)


def test_min_recovery_gate_fails_with_marked_cells(run_cli, tiny_llama):
    code, out, err = run_cli("eval", tiny_llama, tiny_llama, "--tasks", TASK_YAML, "--limit", LIMIT,
                             "--min-recovery", "101%", "--threads", THREADS, "--no-write")
    assert code == 1, err
    assert "100.0% ± 0.0 !" in out
    line = err.strip().splitlines()[-1]
    assert "1 quality gate(s) failed" in line and "--min-recovery 101%" in line and "Traceback" not in err
    code, out, err = run_cli("eval", tiny_llama, tiny_llama, "--tasks", TASK_YAML, "--limit", LIMIT,
                             "--min-recovery", "0.97", "--threads", THREADS, "--no-write", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["passed"] and data["tasks"][0]["recovery"] == 1.0 and data["gates"]["recovery"]["limit"] == 0.97


def test_bad_task_name_and_bad_yaml_one_line(run_cli, tiny_llama, tmp_path):
    code, out, err = run_cli("eval", tiny_llama, tiny_llama, "--tasks", "arc_easyy", "--no-write")
    assert code != 0 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: ") and "arc_easyy" in line and "arc_easy" in line.split("close:")[1]
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: broken\ndoc_to_text: [unclosed\n")
    code, out, err = run_cli("eval", tiny_llama, tiny_llama, "--tasks", bad, "--no-write")
    assert code != 0 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: ") and str(bad) in line and "not valid" in line
    missing = tmp_path / "missing.yaml"
    missing.write_text(TASK_YAML.read_text())  # its data file is not next to this copy
    code, out, err = run_cli("eval", tiny_llama, tiny_llama, "--tasks", missing, "--no-write")
    line = err.strip().splitlines()[-1]
    assert code != 0 and "own_eval.jsonl does not exist" in line and "Traceback" not in err
    code, out, err = run_cli("eval", tiny_llama, tiny_llama, "--min-recovery", "0.9", "--no-write")
    assert code != 0 and "need --tasks" in err
    code, out, err = run_cli("eval", tiny_llama, tiny_llama, "--chat-template", "--no-write")
    assert code != 0 and "--chat-template need --tasks" in err


# ----------------------------------------------------------------------------------- generation tasks
GSM_YAML = Path(__file__).resolve().parents[1] / "examples" / "own-gsm" / "own_gsm.yaml"


def _gen(lm, context: str, until, max_gen_toks: int) -> str:
    from lm_eval.api.instance import Instance

    req = Instance("generate_until", {}, (context, {"until": until, "max_gen_toks": max_gen_toks,
                                                      "do_sample": False}), 0)
    (out,) = lm.generate_until([req], disable_tqdm=True)
    return out


def test_generate_until_in_llama_cpp_honours_stops_and_length(tiny_gguf_set, tiny_llama):
    from transformers import AutoTokenizer

    from quantkit import engines

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    lm = engines.get("llama.cpp").task_lm(gguf_path(tiny_gguf_set, "Q8_0"), base_tokenizer=tok,
                                          base_path=tiny_llama, max_length=256, threads=THREADS)
    try:
        ctx = "Question: Tom has 3 apples and buys 2 more. How many apples does he have?\nAnswer:"
        free = _gen(lm, ctx, [], 16)
        ids = tok(free, add_special_tokens=False).input_ids
        assert free.strip() and 0 < len(ids) <= 17, free  # at most 16 new tokens (re-tokenising may merge)
        assert free.startswith(_gen(lm, ctx, [], 4))  # greedy: a shorter run is a prefix of a longer one
        stop = free[len(free) // 2:len(free) // 2 + 2]
        assert stop.strip(), free
        assert _gen(lm, ctx, [stop], 16) == free.split(stop)[0]  # cut at the stop string, which is dropped
        with pytest.raises(Exception, match="greedily"):
            from lm_eval.api.instance import Instance

            lm.generate_until([Instance("generate_until", {}, (ctx, {"do_sample": True, "temperature": 0.7}), 0)])
    finally:
        lm.close()


def test_generation_task_rows_per_filter_same_requests_for_every_variant(tiny_llama, tiny_gguf_set, tiny_gptq):
    """own_gsm (generate_until, strict-match and flexible-extract) on the base in transformers, both GGUFs in
    llama.cpp and a GPTQ folder in transformers: one row per filter and variant, all on the base's requests."""
    from quantkit.tasks import eval_tasks

    rep = eval_tasks(str(tiny_llama), [str(tiny_gguf_set), str(tiny_gptq)], str(GSM_YAML), limit=3, threads=THREADS,
                     write_manifest=False)
    names = {"own_gsm/strict-match", "own_gsm/flexible-extract"}
    assert set(rep.base["tasks"]) == names
    for name in names:
        b = rep.base["tasks"][name]
        assert b["n"] == 3 and b["shots"] == 4 and b["metric"] == "exact_match"
        rows = [r for r in rep.rows if r["task"] == name]
        assert sorted(r["engine_short"] for r in rows) == ["llama.cpp", "llama.cpp", "transformers"]
        assert all(r["requests_sha256"] == b["requests_sha256"] and r["n"] == 3 for r in rows)
    ((context, kw),) = json.loads(next(iter(rep.base["tasks"]["own_gsm/strict-match"]["requests"].values())))
    assert context.count("Question:") == 5 and kw["until"][:2] == ["Question:", "\n\n"]  # 4 shots + the doc


def test_a_task_whose_dataset_needs_a_download_names_it(run_cli, tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    y = tmp_path / "hub_task.yaml"
    y.write_text("task: hub_task\ndataset_path: acme/word-problems\noutput_type: generate_until\ntest_split: test\n"
                 "doc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: exact_match\n"
                 "    higher_is_better: true\n")
    code, out, err = run_cli("eval", tiny_llama, tiny_llama, "--tasks", y, "--no-write")
    line = err.strip().splitlines()[-1]
    assert code != 0 and "Traceback" not in err
    assert "needs the dataset acme/word-problems from the Hub" in line and "dataset_path: json" in line, line


# ----------------------------------------------------------------------------------- quantkit run: the tasks stage
def _tasks_recipe(tmp_path, model, tasks=(TASK_YAML,), extra="") -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text(f"""\
quantkit: 1
model: {model}
out: {tmp_path / 'out'}
variants:
  - method: gguf
    types: [Q8_0, Q4_K_M]
eval:
  ctx: 128
  max_tokens: 256
  bench: false
  tasks:
{''.join(f"    - {t}" + chr(10) for t in tasks)}  limit: {LIMIT}
{extra}""")
    return p


def test_recipe_tasks_stage_report_card_cache_and_gate(tmp_path, tiny_llama, converted_tiny, run_cli, monkeypatch):
    from test_pipeline import done_counts, seed

    from quantkit.pipeline import RUN_LOG

    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path / "qk-cache"))  # a fresh base-score cache
    r, out = _tasks_recipe(tmp_path, tiny_llama), tmp_path / "out"
    seed(converted_tiny, out)
    code, stdout, err = run_cli("run", r, "--json")
    assert code == 0, err
    folder = out / converted_tiny.name
    m = json.loads((folder / "quantkit.json").read_text())
    runlog = json.loads((out / RUN_LOG).read_text())["stages"]
    base_scores = set()
    for t in ("Q8_0", "Q4_K_M"):
        (art,) = [a for a in m["artifacts"].values() if a.get("type") == t]
        s = art["tasks"][TASK]
        assert s["n"] == LIMIT and s["limit"] == LIMIT and s["shots"] == 0 and s["metric"] == "acc_norm"
        assert s["engine"].startswith("llama.cpp") and s["recovery"] == pytest.approx(s["score"] / s["base_score"])
        assert "tasks" in art["recipe_stages"]
        rec = runlog[f"tasks:{t}"]["result"]
        assert rec["tasks"][TASK]["score"] == s["score"] and rec["tasks"][TASK]["recovery"] == s["recovery"]
        base_scores.add(s["base_score"])
    assert len(base_scores) == 1  # one base, scored once: the second variant read it from the cache
    assert [runlog[f"tasks:{t}"]["result"]["base_cached"] for t in ("Q8_0", "Q4_K_M")] == [False, True]
    from quantkit.records import TaskScore

    report = (out / "quantkit-report.md").read_text()
    card = (folder / "README.md").read_text()
    assert "## Task accuracy" in report and "Task accuracy" in card
    for a in m["artifacts"].values():
        s = TaskScore.from_json({"task": TASK, **a["tasks"][TASK]})
        assert f"| {s.base_shown} | {a['type']} | {s.score_shown} | {s.recovery_shown} |" in report
        assert f"| {s.base_shown} | {a['path']} | {s.score_shown} | {s.recovery_shown} |" in card
    # a re-run is cached: no stage runs again
    before = done_counts(out)
    code, stdout, err = run_cli("run", r, "--json")
    assert code == 0, err
    assert done_counts(out) == before and before["tasks:Q8_0"] == 1
    assert all(v["stages"]["tasks"] == "cached" for v in json.loads(stdout)["variants"])
    # a recovery gate nothing can pass: exit 1, both variants marked, still nothing re-scored
    code, stdout, err = run_cli("run", r, "--json", "--set", "eval.min_recovery=100000%")
    assert code == 1
    res = json.loads(stdout)
    assert done_counts(out)["tasks:Q8_0"] == 1
    for v in res["variants"]:
        assert v["status"] == "gate failed" and v["gates"]["min_recovery"] is False
        assert v["error"].startswith("min_recovery 100000%: own_eval_mc")


def test_recipe_generation_task_rows_reach_manifest_report_and_card(tmp_path, tiny_llama, converted_tiny, run_cli):
    from test_pipeline import seed

    r, out = _tasks_recipe(tmp_path, tiny_llama, tasks=(GSM_YAML,)), tmp_path / "out"
    r.write_text(r.read_text().replace("types: [Q8_0, Q4_K_M]", "types: [Q8_0]").replace(f"limit: {LIMIT}",
                                                                                         "limit: 2"))
    seed(converted_tiny, out)
    code, stdout, err = run_cli("run", r, "--json")
    assert code == 0, err
    folder = out / converted_tiny.name
    (art,) = json.loads((folder / "quantkit.json").read_text())["artifacts"].values()
    names = {"own_gsm/strict-match", "own_gsm/flexible-extract"}
    assert set(art["tasks"]) == names and all(art["tasks"][n]["n"] == 2 for n in names)
    for page in (out / "quantkit-report.md", folder / "README.md"):
        text = page.read_text()
        assert all(f"| {n} | exact_match | 4 |" in text for n in names), page


def test_recipe_bad_task_path_is_one_line(tmp_path, run_cli):
    r = _tasks_recipe(tmp_path, "builtin:smollm2-135m", tasks=(TASK_YAML, "no/such/task.yaml"))
    code, out, err = run_cli("recipe", "check", r)
    line = err.strip().splitlines()[-1]
    assert code != 0 and "Traceback" not in err
    assert line.startswith(f"error: {r}:13: eval.tasks[1]: ") and "no/such/task.yaml" in line
    copy = tmp_path / "copy.yaml"
    copy.write_text(TASK_YAML.read_text())  # its data file is not next to this copy
    r = _tasks_recipe(tmp_path, "builtin:smollm2-135m", tasks=(copy,))
    code, out, err = run_cli("recipe", "check", r)
    line = err.strip().splitlines()[-1]
    assert code != 0 and line.startswith(f"error: {r}:12: eval.tasks[0]: ") and "own_eval.jsonl does not exist" in line
    r = _tasks_recipe(tmp_path, "builtin:smollm2-135m", extra="  min_recovery: 95%\n")
    code, out, err = run_cli("recipe", "check", r)
    assert code == 0, err


# ------------------------------------------------------------------------------------------ SmolLM2 (slow)
@pytest.mark.slow
def test_smollm2_gguf_equal_to_llama_cpp(smollm2_gguf_set, smollm2_hf):
    _check_equal_to_llama_cpp(gguf_path(smollm2_gguf_set, "Q8_0"), smollm2_hf)


@pytest.mark.slow
def test_smollm2_generation_task_q8_recovers_more_than_q2k(smollm2_hf, smollm2_gguf_set):
    from quantkit.tasks import eval_tasks

    q8, q2 = gguf_path(smollm2_gguf_set, "Q8_0"), gguf_path(smollm2_gguf_set, "Q2_K")
    rep = eval_tasks(str(smollm2_hf), [str(q8), str(q2)], str(GSM_YAML), threads=THREADS, write_manifest=False)
    print(rep.table())
    b = rep.base["tasks"]["own_gsm/strict-match"]
    assert b["n"] == 50 and b["score"] > 0.1 and b["stderr"] > 0
    rows = {r["type"]: r for r in rep.rows if r["task"] == "own_gsm/strict-match"}
    assert all(r["n"] == 50 and r["requests_sha256"] == b["requests_sha256"] for r in rows.values())
    # measured: base 38.0% +- 6.9; Q8_0 40.0% (recovery 105.3% +- 5.5), Q2_K 18.0% (47.4% +- 13.7)
    assert rows["Q8_0"]["recovery"] > rows["Q2_K"]["recovery"], rows
    assert rows["Q8_0"]["recovery_se"] is not None and rows["Q2_K"]["recovery_se"] is not None


@pytest.mark.slow
def test_smollm2_q2k_recovers_less_than_q8(smollm2_hf, smollm2_gguf_set, tmp_path):
    from quantkit.gptq import quantize_gptq
    from quantkit.tasks import eval_tasks

    q8, q2 = gguf_path(smollm2_gguf_set, "Q8_0"), gguf_path(smollm2_gguf_set, "Q2_K")
    gptq = quantize_gptq(str(smollm2_hf), fmt="classic", out=tmp_path / "gptq", samples=32, seq_len=256,
                         group_size=64, device="cpu").folder  # 576 = 9 x 64
    rep = eval_tasks(str(smollm2_hf), [str(q8), str(q2), str(gptq)], str(TASK_YAML), threads=THREADS,
                     min_recovery=0.9, write_manifest=False)
    print(rep.table())
    b = rep.base["tasks"][TASK]
    assert b["n"] == 50 and b["score"] > 0.4  # well above chance (25%) on these easy questions
    for r in rep.rows:  # every variant, scored by its own engine, on the base's 50 requests
        assert r["n"] == 50 and r["requests_sha256"] == b["requests_sha256"]
    r8 = next(r for r in rep.rows if r["type"] == "Q8_0")
    r2 = next(r for r in rep.rows if r["type"] == "Q2_K")
    rg = next(r for r in rep.rows if r["format"] == "gptq")
    assert r2["recovery"] < r8["recovery"] and r8["recovery"] >= 0.9
    # measured: base 60.0%; Q8_0 100.0%, Q2_K 76.7% +- 7.8, GPTQ-4 g64 (32 x 256 calibration) 80.0% +- 8.5
    assert rg["engine_short"] == "transformers" and rg["recovery"] > 0.6  # chance is 25% / 60% = 0.42
    failed = [f["variant"] for f in rep.failed]
    assert r2["variant"] in failed and r8["variant"] not in failed
    assert sorted(failed) == sorted(r["variant"] for r in rep.rows if r["recovery"] < 0.9)
