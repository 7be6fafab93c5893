"""quantkit run: a recipe end to end (real GGUF files, real eval, real card, real pushes to the local Hub),
resume after a crash with no stage done twice, gates, --only, --dry-run, plan's early stop."""

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from quantkit.pipeline import RUN_LOG

RECIPES = Path(__file__).parent.parent / "recipes"


def tiny_recipe(tmp_path, model, *, types=("Q8_0", "Q4_K_M"), publish=False, bench=False, extra="",
                max_tokens=384):
    text = f"""\
quantkit: 1
model: {model}
out: {tmp_path / 'out'}
variants:
  - method: gguf
    types: [{', '.join(types)}]
eval:
  ctx: 128
  max_tokens: {max_tokens}
  max_kld: 0.5
  bench:
    enabled: {'true' if bench else 'false'}
    prompt_tokens: 16
    gen_tokens: 8
    repeats: 1
publish:
  enabled: {'true' if publish else 'false'}
  repo: alice-org/{{model_name}}-{{method}}
  private: true
{extra}"""
    p = tmp_path / "recipe.yaml"
    p.write_text(text)
    return p


@pytest.fixture(scope="module")
def converted_tiny(tiny_llama, tmp_path_factory) -> Path:
    """tiny_llama converted to GGUF once for this module (the slow part: llama.cpp's converter), no artifacts.

    Each test copies it into its own out folder (:func:`seed`), so quantise/eval/card/push all do real work
    but the HF -> GGUF conversion, which quantize_gguf re-uses by key, is not repeated per test."""
    from quantkit.gguf import quantize_gguf

    folder = tmp_path_factory.mktemp("seed") / "tiny-llama-s0-v1-GGUF"
    res = quantize_gguf(str(tiny_llama), ["Q8_0"], folder)
    for p in res.paths():
        p.unlink()
    m = json.loads((folder / "quantkit.json").read_text())
    m["artifacts"], m["history"] = {}, []
    (folder / "quantkit.json").write_text(json.dumps(m))
    return folder


def seed(converted: Path, out: Path) -> None:
    import shutil

    shutil.copytree(converted, out / converted.name)


def events(out: Path) -> list[dict]:
    return json.loads((out / RUN_LOG).read_text())["events"]


def done_counts(out: Path) -> Counter:
    """How many times each stage really ran to completion, over every run of this out folder."""
    return Counter(e["stage"] for e in events(out) if e["event"] == "done")


def test_recipe_end_to_end_with_push(tmp_path, tiny_llama, converted_tiny, hub_server, run_cli):
    r = tiny_recipe(tmp_path, tiny_llama, publish=True)
    out = tmp_path / "out"
    seed(converted_tiny, out)
    code, stdout, err = run_cli("run", r, "--dry-run")
    assert code == 0, err
    assert "quantize:Q8_0" in stdout and "to do" in stdout and not (out / RUN_LOG).exists()
    assert not list((out / "tiny-llama-s0-v1-GGUF").glob("*.gguf"))
    code, stdout, err = run_cli("run", r, "--json")
    assert code == 0, (stdout + err)[-3000:]
    res = json.loads(stdout)
    assert res["passed"] and res["exit_code"] == 0
    names = [v["name"] for v in res["variants"]]
    assert names == ["Q8_0", "Q4_K_M"]
    folder = out / "tiny-llama-s0-v1-GGUF"
    for v in res["variants"]:
        assert v["status"] == "done", v
        assert Path(v["path"]).is_file() and v["path"].endswith(".gguf")
        assert v["eval"]["kld_mean"] < 0.5 and v["eval"]["tokens"] > 0
        assert v["eval"]["tokens_per_second"] > 0
        assert v["pushed"] == "alice-org/tiny-llama-s0-v1-GGUF"
    # Q8_0 is closer to the base than Q4_K_M
    kld = {v["name"]: v["eval"]["kld_mean"] for v in res["variants"]}
    assert kld["Q8_0"] < kld["Q4_K_M"]
    # report next to the artifacts and in the folder; card written; manifest points at the report
    for f in (out / "quantkit-report.md", out / "quantkit-report.png", folder / "quantkit-report.md",
              folder / "quantkit-report.png", folder / "README.md"):
        assert f.is_file(), f
    assert (out / "quantkit-report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "quantkit-report.md").read_text()
    assert "| Q8_0 | gguf |" in md and "| Q4_K_M | gguf |" in md
    m = json.loads((folder / "quantkit.json").read_text())
    assert m["report"]["markdown"] == "quantkit-report.md"
    assert any(h["stage"] == "recipe.quantize" for h in m["history"])
    log = json.loads((out / RUN_LOG).read_text())["stages"]
    stamped = m["artifacts"]["tiny-llama-s0-v1-Q4_K_M.gguf"]["recipe_stages"]
    assert stamped == {"quantize": log["quantize:Q4_K_M"]["key"], "eval": log["eval:Q4_K_M"]["key"]}
    # on the Hub: both GGUFs, the card, the report
    files = set(hub_server.files("alice-org/tiny-llama-s0-v1-GGUF"))
    assert {"tiny-llama-s0-v1-Q8_0.gguf", "tiny-llama-s0-v1-Q4_K_M.gguf", "README.md",
            "quantkit-report.md", "quantkit-report.png"} <= files, files
    head = hub_server.head("alice-org/tiny-llama-s0-v1-GGUF")

    # re-run: everything cached, nothing done again, nothing pushed again
    before = done_counts(out)
    code, stdout, err = run_cli("run", r)
    assert code == 0, (stdout + err)[-2000:]
    assert done_counts(out) == before
    assert "cached" in stdout
    assert hub_server.head("alice-org/tiny-llama-s0-v1-GGUF") == head

    # dry run of an edited recipe: what is cached, what is to do; nothing runs
    code, stdout, err = run_cli("run", r, "--dry-run", "--set", "variants.0.types=[Q8_0, Q5_K_M]", "--json")
    st = {s["stage"]: s["status"] for s in json.loads(stdout)["stages"]}
    assert st["quantize:Q8_0"] == "cached" and st["eval:Q8_0"] == "cached"
    assert st["quantize:Q5_K_M"] == "to do" and st["eval:Q5_K_M"] == "to do"
    assert not (folder / "tiny-llama-s0-v1-Q5_K_M.gguf").exists() and done_counts(out) == before

    # a stricter gate: quantise/eval are NOT redone (gates are not part of their keys), the variants fail,
    # exit 1, and nothing is pushed (only the report and card, whose input changed, are rewritten)
    code, stdout, err = run_cli("run", r, "--set", "eval.max_kld=0.0000001", "--json")
    assert code == 1
    res = json.loads(stdout)
    assert {v["status"] for v in res["variants"]} == {"gate failed"}
    work = lambda c: {k: n for k, n in c.items() if not k.startswith("card:")}  # noqa: E731
    assert work(done_counts(out)) == work(before)
    assert hub_server.head("alice-org/tiny-llama-s0-v1-GGUF") == head
    before = done_counts(out)

    # editing one variant redoes only that one: add Q6_K
    code, stdout, err = run_cli("run", r, "--set", "variants.0.types=[Q8_0, Q4_K_M, Q6_K]", "--no-push",
                                "--only", "Q6_K,Q8_0", "--json")
    assert code == 0, (stdout + err)[-2000:]
    after = done_counts(out)
    new = {k for k in after if after[k] != before.get(k)}
    assert {"quantize:Q6_K", "eval:Q6_K"} <= new
    assert not any(k.endswith(("Q8_0", "Q4_K_M")) for k in new), new


def test_the_model_is_resolved_once_and_passed_down(tmp_path, tiny_llama, hub_server, run_cli, monkeypatch):
    """A recipe on a Hub model: the pull stage resolves it (one Hub lookup + download) and every later stage
    (quantise, verify on build, eval) works from that record; none looks the model up again."""
    from quantkit import hub

    sha = hub_server.seed("acme/tiny-llama", tiny_llama)
    calls = Counter()
    for name in ("_pull", "_local_source"):
        real = getattr(hub, name)

        def counted(*a, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(*a, **kw)

        monkeypatch.setattr(hub, name, counted)
    r = tiny_recipe(tmp_path, "acme/tiny-llama", types=("Q8_0",), max_tokens=128)
    code, stdout, err = run_cli("run", r, "--json")
    assert code == 0, (stdout + err)[-3000:]
    (v,) = json.loads(stdout)["variants"]
    assert v["status"] == "done" and v["eval"]["tokens"] > 0, v
    assert calls == Counter({"_pull": 1}), calls
    base = json.loads((tmp_path / "out" / "tiny-llama-GGUF" / "quantkit.json").read_text())["base"]
    assert base["id"] == "acme/tiny-llama" and base["sha"] == sha


def test_bench_stage_measures_the_base_in_the_same_engine_once(tmp_path, tiny_llama, converted_tiny, run_cli,
                                                                monkeypatch):
    """`quantkit run` with bench: each variant's bench record holds the base measured in llama.cpp (the folder's
    unquantised GGUF) and non-null gains; the base is measured once (bench's cache), not per variant or per run;
    the report, the card and the run table show the base row and the gains."""
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path / "qk-cache"))  # an empty bench cache
    r = tiny_recipe(tmp_path, tiny_llama, bench=True, max_tokens=128)
    out = tmp_path / "out"
    seed(converted_tiny, out)
    folder = out / converted_tiny.name
    code, stdout, err = run_cli("run", r, "--json")
    assert code == 0, (stdout + err)[-3000:]
    m = json.loads((folder / "quantkit.json").read_text())
    inter = m["intermediates"]["convert"]["path"]
    stages = json.loads((out / RUN_LOG).read_text())["stages"]
    ids = set()
    for v in json.loads(stdout)["variants"]:
        rec = m["artifacts"][v["artifact"]]["bench"]
        assert rec == stages[f"bench:{v['name']}"]["result"] == v["bench"]  # quantkit.json = run log = result
        base = rec["base"]
        assert base["engine"].startswith("llama.cpp") and rec["engine"].startswith("llama.cpp")
        assert base["path"] == str((folder / inter).resolve()) and base["label"] == "base, llama.cpp"
        for g in ("pp_gain", "tg_gain", "size_gain", "memory_gain"):
            assert rec[g] is not None and rec[g] > 0, (g, rec)
        assert rec["tg_gain"] == pytest.approx(rec["tg_tps"] / base["tg_tps"])
        assert rec["size_gain"] == pytest.approx(base["size"] / rec["size"]) and rec["size_gain"] > 3
        assert rec["memory_gain"] == pytest.approx(base["peak_memory"] / rec["peak_memory"])
        assert rec["memory_gain"] > 1
        ids.add(base["measurement_id"])
    assert len(ids) == 1  # one base measurement for both variants
    base_rows = [a["bench"]["base"] for a in m["artifacts"].values()]
    assert sorted(b["cached"] for b in base_rows) == [False, True]  # measured for the first, reused for the next
    first = next(b for b in base_rows if not b["cached"])

    # the run table, the report and the card show the base row and the gains
    code, table, err = run_cli("run", r)
    assert code == 0 and "tg x" in table and "mem x" in table and "(base, llama.cpp" in table, table
    md = (out / "quantkit-report.md").read_text()
    assert f"| {first['name']} | base, llama.cpp |" in md and "| tg x |" in md and "| mem x |" in md
    q4 = m["artifacts"]["tiny-llama-s0-v1-Q4_K_M.gguf"]["bench"]
    assert f"| {q4['tg_gain']:.2f}x |" in md and f"| {q4['memory_gain']:.2f}x |" in md
    assert "Gains (x) are relative to the base measured in the same engine" in md
    card = (folder / "README.md").read_text()
    assert f"| {first['name']} (base, llama.cpp) |" in card and "Gen vs base" in card
    assert f"{q4['tg_gain']:.2f}x" in card and f"{q4['memory_gain']:.2f}x" in card
    assert "Load average (1 min) at the start" in card

    # a new variant in a later run: its bench runs, the base comes from the cache (same measurement)
    before = done_counts(out)
    code, stdout, err = run_cli("run", r, "--set", "variants.0.types=[Q8_0, Q4_K_M, Q6_K]", "--json")
    assert code == 0, (stdout + err)[-3000:]
    after = done_counts(out)
    assert after["bench:Q6_K"] == 1 and after["bench:Q8_0"] == before["bench:Q8_0"] == 1
    q6 = next(v for v in json.loads(stdout)["variants"] if v["name"] == "Q6_K")["bench"]
    assert q6["base"]["measurement_id"] == first["measurement_id"] and q6["base"]["cached"] is True
    assert q6["base"]["measured_at"] == first["measured_at"] and q6["tg_gain"] is not None


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_cancel_during_bench_stops_now_and_a_rerun_completes(tmp_path, tiny_llama, converted_tiny, sig):
    """SIGINT (Ctrl-C) or SIGTERM (a CI runner's cancel) to `quantkit run` while the bench stage measures in its
    child process: exit 130 / 143 within seconds with one line (was: the driver waited for the child to finish its
    repeats; SIGTERM killed quantkit at once with no line), the child gone, and the same command with a lighter
    bench finishes the run from the stage keys."""
    import signal
    import time

    sig = getattr(signal, sig)

    import psutil

    r = tiny_recipe(tmp_path, tiny_llama, types=("Q8_0",), bench=True, max_tokens=128)
    r.write_text(r.read_text().replace("gen_tokens: 8", "gen_tokens: 256").replace("repeats: 1", "repeats: 80"))
    out = tmp_path / "out"
    seed(converted_tiny, out)
    env = {**os.environ, "QUANTKIT_NO_PROGRESS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "quantkit.cli", "run", str(r)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    try:
        end = time.time() + 300
        while time.time() < end and not any(e["stage"] == "bench:Q8_0" and e["event"] == "started"
                                            for e in (events(out) if (out / RUN_LOG).is_file() else [])):
            time.sleep(0.1)
        kids = psutil.Process(p.pid).children(recursive=True)
        while not kids and time.time() < end:  # the measurement's child process
            time.sleep(0.1)
            kids = psutil.Process(p.pid).children(recursive=True)
        t0 = time.time()
        p.send_signal(sig)
        _, err = p.communicate(timeout=120)
        took = time.time() - t0
    finally:
        p.kill()
    assert p.returncode == 128 + sig and took < 5, (p.returncode, took, err[-2000:])
    how = "interrupted" if sig == signal.SIGINT else "cancelled by SIGTERM"
    assert err.strip().splitlines()[-1].startswith(f"error: {how}: what was finished is kept")
    assert "Traceback" not in err
    _, alive = psutil.wait_procs(kids, timeout=10)
    assert not alive
    r.write_text(r.read_text().replace("repeats: 80", "repeats: 1"))
    code = subprocess.run([sys.executable, "-m", "quantkit.cli", "run", str(r)], env=env, capture_output=True,
                          text=True)
    assert code.returncode == 0, code.stderr[-2000:]
    assert done_counts(out)["bench:Q8_0"] == 1 and done_counts(out)["quantize:Q8_0"] == 1


def test_crash_mid_stage_then_resume(tmp_path, tiny_llama, converted_tiny):
    """SIGKILL while quantising Q4_K_M; the re-run finishes and no stage is done twice."""
    r = tiny_recipe(tmp_path, tiny_llama, max_tokens=256)
    out = tmp_path / "out"
    seed(converted_tiny, out)
    env = {**os.environ, "QUANTKIT_CRASH_AT": "quantize:Q4_K_M", "QUANTKIT_NO_PROGRESS": "1"}
    p = subprocess.run([sys.executable, "-m", "quantkit.cli", "run", str(r)], env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == -9, p.stderr[-2000:]
    ev = events(out)
    assert [e["event"] for e in ev if e["stage"] == "quantize:Q4_K_M"] == ["started"]
    assert done_counts(out)["quantize:Q8_0"] == 1 and done_counts(out)["eval:Q8_0"] == 1

    env.pop("QUANTKIT_CRASH_AT")
    p = subprocess.run([sys.executable, "-m", "quantkit.cli", "run", str(r)], env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    counts = done_counts(out)
    assert counts["quantize:Q4_K_M"] == 1 and counts["eval:Q4_K_M"] == 1
    assert all(n == 1 for n in counts.values()), counts  # no stage done twice
    second_run = [e for e in events(out) if e["stage"] in ("quantize:Q8_0", "eval:Q8_0")][-2:]
    assert [e["event"] for e in second_run] == ["cached", "cached"]
    assert "all 2 variant(s) passed" in p.stdout


def test_one_failing_variant_keeps_the_others(tmp_path, tiny_llama, converted_tiny):
    # the calibration file vanishes after the recipe was checked: the imatrix variant fails, Q8_0 is kept
    cal = tmp_path / "cal.txt"
    cal.write_text("some calibration text\n" * 50)
    r = tiny_recipe(tmp_path, tiny_llama, types=("Q8_0",),
                    extra=f"calibration:\n  spec: {cal}\n").read_text()
    r = r.replace("  ctx: 128", "  enabled: false\n  ctx: 128")
    r = r.replace("    types: [Q8_0]\n",
                  "    types: [Q8_0]\n  - method: gguf\n    types: [IQ4_XS]\n    imatrix: true\n")
    path = tmp_path / "two.yaml"
    path.write_text(r)
    seed(converted_tiny, tmp_path / "out")
    from quantkit.pipeline import Pipeline
    from quantkit.recipe import load_recipe

    recipe = load_recipe(path)
    cal.unlink()
    res = Pipeline(recipe).run()
    st = {v.name: v.status for v in res.variants}
    assert st == {"Q8_0": "done", "IQ4_XS": "failed"}, [(v.name, v.error) for v in res.variants]
    assert res.exit_code == 1
    assert "calibration" in res.variants[1].error
    assert "1 of 2 variant(s) failed" in res.table()


def test_plan_stops_a_run_that_cannot_fit(tmp_path, run_cli):
    # a local "model" whose config says 70B (headers would say otherwise: no weights here, so the config counts)
    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "config.json").write_text((Path(__file__).parent / "data" / "llama-3.3-70b-instruct.config.json")
                                        .read_text())
    from quantkit.plan import plan

    p = plan(str(folder))
    assert p.params_total == 70_553_706_496
    r = tmp_path / "big.yaml"
    r.write_text(f"quantkit: 1\nmodel: {folder}\nout: {tmp_path / 'o'}\nvariants:\n  - method: awq\n")
    from quantkit.errors import QuantkitError
    from quantkit.pipeline import Pipeline
    from quantkit.recipe import load_recipe

    pl = Pipeline(load_recipe(r))
    # the disk is checked first: on a box with less free disk than the 70B's AWQ needs, that is the refusal
    short_of_disk = p.needs["awq"].disk_bytes > shutil.disk_usage(tmp_path).free
    with pytest.raises(QuantkitError, match=f"needs about .* GB of {'disk' if short_of_disk else 'RAM'}"):
        pl.check_machine()


@pytest.mark.slow
def test_demo_recipe_smollm2_end_to_end(tmp_path, hub_server, run_cli, monkeypatch):
    """The shipped demo recipe on the real SmolLM2-135M, pushed to the local Hub."""
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli("run", RECIPES / "demo-smollm2.yaml", "--set", "publish.enabled=true",
                             "--set", "publish.repo=alice-org/{model_name}-{method}", "--json")
    assert code == 0, (out + err)[-3000:]
    res = json.loads(out)
    assert [v["status"] for v in res["variants"]] == ["done", "done", "done"]
    files = set(hub_server.files("alice-org/SmolLM2-135M-Instruct-GGUF"))
    assert {"README.md", "quantkit-report.png"} <= files
    assert sum(f.endswith(".gguf") for f in files) == 3


@pytest.mark.slow
def test_real_kill_during_quantisation_smollm2(tmp_path, smollm2_hf):
    """Kill (SIGKILL) `quantkit run` while llama.cpp is converting/quantising SmolLM2, then resume."""
    import signal
    import time

    r = tiny_recipe(tmp_path, smollm2_hf, types=("Q8_0", "Q4_K_M"))
    out = tmp_path / "out"
    env = {**os.environ, "QUANTKIT_NO_PROGRESS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "quantkit.cli", "run", str(r)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if (out / RUN_LOG).is_file() and any(e["stage"] == "quantize:Q4_K_M" and e["event"] == "started"
                                             for e in events(out)):
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    p = subprocess.run([sys.executable, "-m", "quantkit.cli", "run", str(r)], env=env, capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    assert all(n == 1 for n in done_counts(out).values()), done_counts(out)
