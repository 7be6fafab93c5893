"""Recipe files: validation with file:line:field errors, env vars, --set overrides, init/check commands."""

import pytest

from quantkit.errors import QuantkitError
from quantkit.recipe import load_recipe, parse_recipe

pytestmark = pytest.mark.unit  # no model, no llama.cpp: recipes are parsed, never run

GOOD = """\
quantkit: 1
model: Qwen/Qwen2.5-7B-Instruct
variants:
  - method: gguf
    types: [Q4_K_M, q8_0]
    imatrix: true
  - method: awq
    bits: 4
  - method: gptq
    bits: 8
    act_order: true
calibration:
  samples: 64
eval:
  max_kld: 0.05
  max_ppl_increase: 5%
publish:
  repo: ${QK_TEST_ORG}/{model_name}-{method}
"""


def write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_good_recipe(tmp_path, monkeypatch):
    monkeypatch.setenv("QK_TEST_ORG", "my-org")
    r = load_recipe(write(tmp_path, GOOD))
    assert r.variant_names() == ["Q4_K_M", "Q8_0", "AWQ-INT4-g128", "GPTQ-INT8-g128"]
    assert r.eval.max_ppl_increase == pytest.approx(0.05) and r.eval.max_kld == 0.05
    assert r.calibration.samples == 64 and r.calibration.seq_len == 512
    repos = {v.name: v.repo for v in r.variants}
    assert repos["Q4_K_M"] == repos["Q8_0"] == "my-org/Qwen2.5-7B-Instruct-GGUF"
    assert repos["AWQ-INT4-g128"] == "my-org/Qwen2.5-7B-Instruct-AWQ"
    assert r.out == "quantkit-out/Qwen2.5-7B-Instruct"
    # --set overrides, typed by YAML
    r2 = load_recipe(write(tmp_path, GOOD), overrides=["eval.max_kld=0.03", "variants.1.bits=4",
                                                       "publish.per=variant", "publish.repo=o/{variant}"])
    assert r2.eval.max_kld == 0.03
    assert {v.repo for v in r2.variants} == {"o/Q4_K_M", "o/Q8_0", "o/AWQ-INT4-g128", "o/GPTQ-INT8-g128"}
    assert len({v.folder for v in r2.variants}) == 4


@pytest.mark.parametrize("edit, line, field, allowed", [
    # typo'd key
    (("  max_kld: 0.05", "  max_kdl: 0.05"), 15, "eval.max_kdl", "did you mean 'max_kld'"),
    # wrong type
    (("  samples: 64", "  samples: many"), 13, "calibration.samples", "positive integer"),
    # unknown method
    (("  - method: awq", "  - method: exl2"), 7, "variants[1].method", "allowed: gguf, awq, gptq"),
    # unknown GGUF type
    (("[Q4_K_M, q8_0]", "[Q4_K_M, Q9_0]"), 5, "variants[0].types[1]", "allowed:"),
    # missing model
    (("model: Qwen/Qwen2.5-7B-Instruct\n", ""), 1, "(top level)", "missing `model`"),
    # bad version
    (("quantkit: 1", "quantkit: 2"), 1, "quantkit", "allowed: 1"),
    # awq bits
    (("    bits: 4", "    bits: 3"), 8, "variants[1].bits", "one of 4"),
    # unset env var
    (("${QK_TEST_ORG}", "${QK_UNSET_VAR_XYZ}"), 18, "publish.repo", "QK_UNSET_VAR_XYZ"),
    # unknown placeholder
    (("{method}", "{methd}"), 18, "publish.repo", "allowed: {model_name}"),
])
def test_malformed_recipes_name_file_line_field(tmp_path, monkeypatch, run_cli, edit, line, field, allowed):
    monkeypatch.setenv("QK_TEST_ORG", "my-org")
    monkeypatch.delenv("QK_UNSET_VAR_XYZ", raising=False)
    text = GOOD.replace(edit[0], edit[1], 1)
    assert text != GOOD
    p = write(tmp_path, text)
    with pytest.raises(QuantkitError) as ei:
        load_recipe(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p}:{line}: {field}: "), msg
    assert allowed in msg
    for cmd in (("recipe", "check", p), ("run", p, "--dry-run")):
        code, out, err = run_cli(*cmd)
        assert code == 2, (cmd, out, err)
        assert err.count("\n") == 1 and field in err and f":{line}:" in err


def test_yaml_syntax_and_empty(tmp_path):
    with pytest.raises(QuantkitError, match=r"r.yaml:4: not valid YAML"):
        load_recipe(write(tmp_path, "quantkit: 1\nmodel: x\nvariants: [\n  - a: b\n"))
    with pytest.raises(QuantkitError, match="empty"):
        load_recipe(write(tmp_path, "# nothing\n"))
    with pytest.raises(QuantkitError, match="no such recipe"):
        load_recipe(tmp_path / "missing.yaml")


def test_duplicate_variants_and_repo_clash(tmp_path):
    base = "quantkit: 1\nmodel: a/b\nvariants:\n"
    with pytest.raises(QuantkitError, match=r"variants\[1\]: variant Q8_0 is also made by variants\[0\]"):
        parse_recipe(base + "  - {method: gguf, types: [Q8_0]}\n  - {method: gguf, types: [Q8_0]}\n")
    with pytest.raises(QuantkitError, match="publish.repo: renders to o/b-AWQ for two output folders"):
        parse_recipe(base + "  - {method: awq, group_size: 128}\n  - {method: awq, group_size: 64}\n"
                            "publish: {repo: 'o/{model_name}-{method}'}\n")
    with pytest.raises(QuantkitError, match="IQ4_XS needs an importance matrix"):
        parse_recipe(base + "  - {method: gguf, types: [IQ4_XS]}\n")
    with pytest.raises(QuantkitError, match="--set eval.ctx=abc: eval.ctx: must be a positive integer"):
        parse_recipe(base + "  - {method: gguf, types: [Q8_0]}\n", overrides=["eval.ctx=abc"])


def test_init_is_a_valid_recipe(tmp_path, run_cli, monkeypatch):
    monkeypatch.setenv("HF_ORG", "my-org")
    code, out, err = run_cli("recipe", "init", "meta-llama/Llama-3.1-8B-Instruct")
    assert code == 0 and out.startswith("# quantkit recipe")
    p = write(tmp_path, out)
    code, out2, err = run_cli("recipe", "check", p)
    assert code == 0, err
    assert "Q4_K_M" in out2


def test_shipped_recipes_are_valid(monkeypatch):
    from pathlib import Path

    monkeypatch.setenv("HF_ORG", "my-org")
    recipes = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
    assert len(recipes) >= 4
    for p in recipes:
        r = load_recipe(p)
        assert r.variants


def test_publish_repo_needs_a_namespace(tmp_path):
    base = "quantkit: 1\nmodel: a/b\nvariants:\n  - {method: gguf, types: [Q8_0]}\n"
    with pytest.raises(QuantkitError, match=r"publish.repo: '\{model_name\}-GGUF' names no namespace"):
        parse_recipe(base + "publish: {repo: '{model_name}-GGUF'}\n")
    parse_recipe(base + "publish: {repo: '{model_name}-GGUF', enabled: false}\n")
    assert parse_recipe(base + "publish: {repo: 'org/{model_name}-GGUF'}\n").variants[0].repo == "org/b-GGUF"
