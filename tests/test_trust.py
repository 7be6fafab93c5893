"""Consent for a model's own code (quantkit.trust): a tiny Llama that ships `configuration_x.py`, `modeling_x.py`
and `tokenization_x.py`, named in its configs' `auto_map`, each writing a marker when imported.

* an architecture transformers knows (`model_type: llama`): every command works without `--trust-remote-code`
  and the marker never appears (GPTQModel imported `modeling_x.py` before: its `prepare_remote_model_init_compat`
  ignores `trust_remote_code`);
* an architecture only its code defines (`model_type: x_llama`): every command refuses in one line naming the flag
  and the files, before any weight is downloaded from the Hub; with the flag the code runs and the record says so.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

FLAG = "--trust-remote-code"


def _card(folder: Path) -> str:
    from quantkit.card import render_card

    return render_card(folder).text


def _last_line(err: str) -> str:
    return [s for s in err.strip().splitlines() if s.strip()][-1]


@pytest.fixture()
def marker(code_models):
    m = code_models[2]
    m.unlink(missing_ok=True)
    yield m
    m.unlink(missing_ok=True)


# -- what a folder holds: no engine --------------------------------------------------------------------------

@pytest.mark.unit
def test_the_files_that_would_run_are_named_and_the_architecture_decides():
    from quantkit.trust import check_configs

    native = {"config.json": {"model_type": "llama", "auto_map": {
        "AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "other/repo--modeling_y.Y"}},
        "tokenizer_config.json": {"tokenizer_class": "LlamaTokenizerFast",
                                  "auto_map": {"AutoTokenizer": ["tokenization_x.T", None]}}}
    c = check_configs(native, ["helper.py"])
    assert c.files == ["configuration_x.py", "helper.py", "other/repo:modeling_y.py", "tokenization_x.py"]
    assert not c.needs_code
    custom = {"config.json": {"model_type": "x_llama", "auto_map": {"AutoConfig": "configuration_x.XConfig"}}}
    c = check_configs(custom, [])
    assert c.needs_code and "x_llama" in c.why and c.files == ["configuration_x.py"]
    tok = {"config.json": {"model_type": "llama"},
           "tokenizer_config.json": {"tokenizer_class": "XTokenizer", "auto_map": {"AutoTokenizer": ["tok_x.X", None]}}}
    assert check_configs(tok, []).needs_code
    assert check_configs({"config.json": {"model_type": "x_llama"}}, []).files == []  # no code: nothing to decide


@pytest.mark.unit
def test_the_code_free_view_links_everything_but_the_code(tmp_path, monkeypatch):
    from quantkit.trust import code_free_view

    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "m"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llama", "auto_map": {"AutoConfig": "c.C"},
                                                 "custom_pipelines": {}, "hidden_size": 8}))
    (src / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["t.T", None]}}))
    (src / "model.safetensors").write_bytes(b"weights")
    (src / "c.py").write_text("raise SystemExit('ran')")
    view = code_free_view(src)
    assert sorted(p.name for p in view.iterdir()) == ["config.json", "model.safetensors", "tokenizer_config.json"]
    assert json.loads((view / "config.json").read_text()) == {"model_type": "llama", "hidden_size": 8}
    assert json.loads((view / "tokenizer_config.json").read_text()) == {}
    assert (view / "model.safetensors").is_symlink() and (view / "model.safetensors").read_bytes() == b"weights"
    assert code_free_view(src) == view  # made once
    (src / "config.json").write_text(json.dumps({"model_type": "llama", "auto_map": {"AutoConfig": "d.D"}}))
    assert code_free_view(src) != view  # a changed config is a new view


# -- every command, without the flag ---------------------------------------------------------------------------

def _calib(tmp_path: Path) -> Path:
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(f"Paragraph {i}: " + "the quick brown fox jumps over the lazy dog. " * 12
                                 for i in range(8)))
    return calib


def _quant_args(method: str, fmt: str, model: Path, tmp_path: Path) -> list:
    return [method, model, "--calibration", _calib(tmp_path), "--samples", "4", "--seq-len", "64", "--group-size",
            "32", "--format", fmt, "--out", tmp_path / "out"]


@pytest.mark.parametrize("method,fmt", [("awq", "classic"), ("gptq", "classic"), ("gptq", "compressed-tensors")])
def test_awq_gptq_load_a_native_model_without_its_code(tmp_path, code_models, marker, run_cli_subprocess, method,
                                                        fmt):
    native = code_models[0]
    code, out, err = run_cli_subprocess(*_quant_args(method, fmt, native, tmp_path), "--json")
    assert code == 0, err[-3000:]
    assert not marker.exists(), marker.read_text()  # GPTQModel imported modeling_x.py here before
    base = json.loads((tmp_path / "out" / "quantkit.json").read_text())["base"]
    assert base["trust_remote_code"] is False and "modeling_x.py" in base["code_files"]
    assert base["local_path"] == str(native)  # the folder itself is recorded, not its view
    assert not list((tmp_path / "out").glob("*.py"))  # and no code is published with the variant
    assert "not run" in _card(tmp_path / "out")


def test_gguf_eval_bench_lora_pull_plan_run_without_the_flag(tmp_path, code_models, marker, run_cli_subprocess,
                                                             tiny_llama):
    from test_lora import build_lora

    native = code_models[0]
    adapter = build_lora(tiny_llama, "tiny-llama")  # trained on the same weights: it fits the copy
    steps = [
        ("pull", native, "--json"),
        ("plan", native),
        ("gguf", native, "--types", "Q8_0", "--out", tmp_path / "gguf"),
        ("eval", native, tmp_path / "gguf", "--ctx", "64", "--max-tokens", "256"),
        ("bench", tmp_path / "gguf", "--base", native, "--prompt-tokens", "16", "--gen-tokens", "4", "--repeats",
         "1"),
        ("lora", adapter, "--base", native, "--out", tmp_path / "lora"),  # llama.cpp's LoRA converter
        ("gguf", native, "--adapter", adapter, "--types", "Q8_0", "--out", tmp_path / "merged"),  # PEFT's merge
    ]
    for args in steps:
        code, out, err = run_cli_subprocess(*args)
        assert code == 0, (args[0], err[-3000:])
        assert not marker.exists(), (args[0], marker.read_text())
    pulled = json.loads(run_cli_subprocess("pull", native, "--json")[1])
    assert pulled["origin"] == str(native) and not list(Path(pulled["path"]).glob("*.py"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"quantkit: 1\nmodel: {native}\nout: {tmp_path / 'run'}\nvariants:\n  - method: gguf\n"
                      "    types: [Q8_0]\neval:\n  ctx: 64\n  max_tokens: 256\n  bench: false\n")
    code, out, err = run_cli_subprocess("run", recipe)
    assert code == 0, err[-3000:]
    assert not marker.exists(), marker.read_text()


# -- a model that needs its code -------------------------------------------------------------------------------

def test_a_model_that_needs_its_code_is_refused_by_every_command(tmp_path, code_models, marker,
                                                                  run_cli_subprocess):
    custom = code_models[1]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"quantkit: 1\nmodel: {custom}\nout: {tmp_path / 'run'}\nvariants:\n  - method: gguf\n"
                      "    types: [Q8_0]\n")
    for args in [("pull", custom), ("gguf", custom, "--types", "Q8_0", "--out", tmp_path / "out"),
                 _quant_args("awq", "classic", custom, tmp_path), _quant_args("gptq", "classic", custom, tmp_path),
                 _quant_args("awq", "compressed-tensors", custom, tmp_path),
                 ("eval", custom, custom), ("bench", custom), ("run", recipe)]:
        code, out, err = run_cli_subprocess(*args)
        last = _last_line(err)
        assert code == 2 and "Traceback" not in err, (args[0], err[-3000:])
        assert FLAG in last and "modeling_x.py" in last and "x_llama" in last, (args[0], last)
        assert not marker.exists(), (args[0], marker.read_text())
        assert not (tmp_path / "out").exists() and not (tmp_path / "run" / "quantkit.json").exists()
    code, out, err = run_cli_subprocess("plan", custom)  # sizes from config.json and the headers: nothing runs
    assert code == 0 and not marker.exists(), err[-2000:]


def test_from_the_hub_refused_before_any_weight_and_no_code_downloaded_without_consent(hub_server, tmp_path,
                                                                                        code_models, marker):
    from quantkit import trust
    from quantkit.errors import QuantkitError
    from quantkit.hub import resolve_model

    native, custom, _ = code_models
    hub_server.seed("acme/custom", custom)
    hub_server.seed("acme/native", native)
    with pytest.raises(QuantkitError, match=r"acme/custom needs its own Python code.*--trust-remote-code"):
        resolve_model("acme/custom")
    got = [path for method, path, _ in hub_server.state.log if method == "GET" and "/resolve/" in path]
    assert any(p.endswith("config.json") for p in got) and not any(p.endswith(".safetensors") for p in got), got
    src = resolve_model("acme/native")
    assert src.origin is not None and not list(src.origin.glob("*.py"))  # the code stays on the Hub
    assert not list(src.path.glob("*.py")) and "auto_map" not in json.loads((src.path / "config.json").read_text())
    assert src.code_files and src.trust_remote_code is False
    try:
        trusted = resolve_model("acme/custom", trust_remote_code=True)
    finally:
        trust.consent(False)
    assert trusted.trust_remote_code and trusted.origin is None
    assert sorted(p.name for p in trusted.path.glob("*.py")) == ["configuration_x.py", "modeling_x.py",
                                                                 "tokenization_x.py"]
    assert not marker.exists()  # downloaded, not run: nothing loaded it yet


def test_with_the_flag_the_code_runs_and_the_record_says_so(tmp_path, code_models, marker, run_cli_subprocess):
    custom = code_models[1]
    code, out, err = run_cli_subprocess(*_quant_args("gptq", "compressed-tensors", custom, tmp_path), FLAG)
    assert code == 0, err[-3000:]
    assert "modeling_x" in marker.read_text()  # consented: transformers ran the model's own code
    base = json.loads((tmp_path / "out" / "quantkit.json").read_text())["base"]
    assert base["trust_remote_code"] is True and base["model_type"] == "x_llama"
    assert "--trust-remote-code" in _card(tmp_path / "out")


def test_the_second_line_transformers_refuses_dynamic_modules_without_consent(code_models, marker):
    """What GPTQModel does (`get_class_from_dynamic_module` on `auto_map`, whatever `trust_remote_code` says) is
    refused in this process once quantkit.trust.guard() is in place, unless consent was given."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from quantkit import trust
    from quantkit.errors import QuantkitError

    native = code_models[0]
    trust.guard()
    with pytest.raises(QuantkitError, match=r"asked to run its own code \(modeling_x\.py\).*--trust-remote-code"):
        get_class_from_dynamic_module("modeling_x.XForCausalLM", str(native))
    assert not marker.exists()
    trust.consent()
    try:
        assert get_class_from_dynamic_module("modeling_x.XForCausalLM", str(native)).__name__ == "XForCausalLM"
    finally:
        trust.consent(False)
    assert "modeling_x" in marker.read_text()


@pytest.mark.unit
def test_a_recipe_says_trust_remote_code_as_a_boolean():
    from quantkit.recipe import RecipeError, parse_recipe

    base = "quantkit: 1\nmodel: acme/m\nvariants:\n  - method: gguf\n    types: [Q8_0]\n"
    assert parse_recipe(base).trust_remote_code is False
    assert parse_recipe(base + "trust_remote_code: true\n").trust_remote_code is True
    with pytest.raises(RecipeError, match=r"r\.yaml:6: trust_remote_code: .*true or false"):
        parse_recipe(base + "trust_remote_code: yes please\n", where="r.yaml")
