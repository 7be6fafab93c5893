"""``quantkit card``: metadata valid for huggingface_hub's ModelCard, tables, run sections, licence rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from quant_folders import BASE_SHA, make_awq_folder, make_gguf_set


def _card(path: Path):
    from huggingface_hub import ModelCard

    return ModelCard.load(path)


def test_templates_are_files():
    from quantkit.card import TEMPLATES

    names = {p.name for p in TEMPLATES.iterdir()}
    assert {"card.md.j2", "files.md.j2", "quality.md.j2", "run_gguf.md.j2", "run_hf.md.j2", "license.md.j2",
            "reproduce.md.j2"} <= names


def test_gguf_card_metadata_tables_and_not_measured(tmp_path, run_cli):
    out = make_gguf_set(tmp_path / "gguf", types=("Q8_0", "Q4_K_M", "Q2_K"))
    code, stdout, err = run_cli("card", out, "--repo", "acme/TinyLlama-Chat-GGUF")
    assert code == 0, err
    card = _card(out / "README.md")
    d = card.data.to_dict()
    assert d["base_model"] == "acme/TinyLlama-Chat" and d["base_model_relation"] == "quantized"
    assert d["license"] == "apache-2.0" and d["pipeline_tag"] == "text-generation"
    assert d["library_name"] == "gguf" and d["quantized_by"]
    assert {"gguf", "quantkit", "Q8_0", "Q4_K_M", "Q2_K"} <= set(d["tags"])
    assert d["language"] == ["en"]  # inherited from the base card
    body = card.text
    assert BASE_SHA in body  # the resolved base revision is in the body
    # provided files: one row per GGUF artifact, none for intermediates
    rows = [ln for ln in body.splitlines() if ln.startswith("| [TinyLlama-Chat-")]
    assert len(rows) == 3
    assert "F16" not in "".join(rows) and ".imatrix" not in "".join(rows)
    q4 = next(r for r in rows if "Q4_K_M" in r)
    assert "4.89" in q4 and "MB" in q4 and "recommended" in q4
    # honest about missing measurements
    assert "Not measured" in body and "| PPL |" not in body
    # how to run, per format
    for s in ("llama-cli -m TinyLlama-Chat-Q4_K_M.gguf", "Llama.from_pretrained", "ollama run hf.co/acme/"
              "TinyLlama-Chat-GGUF:Q4_K_M"):
        assert s in body
    # reproducibility: params, calibration, versions
    assert '"ftype": 15' in body and "builtin:calibration" in body and "| llama-cpp-python | 0.3.36 |" in body
    # no local paths leak into the card
    assert str(tmp_path) not in card.content


def test_gguf_card_quality_table_from_evaluation(tmp_path):
    from quantkit.card import render_card

    out = make_gguf_set(tmp_path / "gguf", evaluated=True)
    text = render_card(out, repo_id="acme/x").text
    assert "Not measured." not in text
    line = next(ln for ln in text.splitlines() if ln.startswith("| TinyLlama-Chat-Q4_K_M.gguf |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1:7] == ["12.2400", "+2.00%", "0.00200", "0.0200", "98.00%", "850.0"]
    assert "builtin:eval" in text and "2,048 tokens" in text and "context 512" in text and "Test CPU" in text
    assert "Base model PPL on that text: 12.0000" in text
    # deterministic: the same manifest renders the same bytes (re-push must be a no-op)
    assert render_card(out, repo_id="acme/x").text == text


def test_awq_card_one_row_for_the_folder(tmp_path, run_cli):
    out = make_awq_folder(tmp_path / "awq")
    code, stdout, err = run_cli("card", out, "--repo", "acme/TinyLlama-Chat-AWQ", "--json")
    assert code == 0, err
    res = json.loads(stdout)
    assert res["metadata"]["library_name"] == "transformers"
    d = _card(out / "README.md").data.to_dict()
    assert {"awq", "quantkit", "4-bit"} <= set(d["tags"]) and d["base_model_relation"] == "quantized"
    body = (out / "README.md").read_text()
    rows = [ln for ln in body.splitlines() if ln.startswith("| [`main`]")]
    assert len(rows) == 1 and "| AWQ |" in rows[0] and "| 4 | 128 |" in rows[0]
    assert "vllm serve acme/TinyLlama-Chat-AWQ" in body and "AutoModelForCausalLM.from_pretrained" in body
    assert '"group_size": 128' in body and "| gptqmodel | 7.6.0 |" in body
    assert "Not measured" in body


def test_llama_licence_name_rule_and_attribution(tmp_path, run_cli):
    out = make_gguf_set(tmp_path / "llama", license="llama3.1", base_id="meta-llama/Llama-3.1-8B-Instruct",
                        model_name="Llama-3.1-8B-Instruct")
    code, _, err = run_cli("card", out, "--repo", "me/Tiny-8B-GGUF")
    assert code == 0
    assert 'begin with "Llama"' in err and "Tiny-8B-GGUF" in err
    body = (out / "README.md").read_text()
    assert "Built with Llama" in body and "use-policy" in body and "Llama 3.1 Community License" in body
    code, _, err = run_cli("card", out, "--repo", "me/Llama-3.1-8B-Instruct-GGUF")
    assert code == 0 and "does not" not in err


def test_gemma_and_noncommercial_licences(tmp_path):
    from quantkit.card import render_card
    from quantkit.licenses import check_license, license_info

    out = make_gguf_set(tmp_path / "gemma", license="gemma", base_id="google/gemma-2-2b-it")
    text = render_card(out, repo_id="me/gemma-2-2b-it-GGUF").text
    assert "Gemma Terms of Use" in text and "ai.google.dev/gemma/terms" in text and "Prohibited Use" in text

    out = make_gguf_set(tmp_path / "nc", license="cc-by-nc-4.0")
    card = render_card(out, repo_id="me/nc-GGUF")
    assert "non-commercial" in card.text.lower() and "no commercial use" in card.text
    assert card.warnings and card.warnings[0].startswith("LICENCE WARNING")
    info = license_info({"license": "cc-by-nc-4.0"})
    with pytest.raises(Exception, match="--accept-license-terms"):
        check_license(info, "me/x", public=True, accept_terms=False)
    assert check_license(info, "me/x", public=True, accept_terms=True)
    assert check_license(info, "me/x", public=False, accept_terms=False)

    custom = license_info({"license": "other", "license_name": "acme-model-license", "license_link": "LICENSE"})
    assert custom.family == "custom"
    out = make_gguf_set(tmp_path / "custom", license="other",
                        license_meta="license_name: acme-model-license\nlicense_link: LICENSE\n")
    d = _card_text_meta(render_card(out, repo_id="me/c").text)
    assert d["license"] == "other" and d["license_name"] == "acme-model-license" and d["license_link"] == "LICENSE"


def _card_text_meta(text: str) -> dict:
    from huggingface_hub import ModelCard

    return ModelCard(text).data.to_dict()


def test_unknown_licence_is_flagged(tmp_path, run_cli):
    out = make_gguf_set(tmp_path / "unk", license=None)
    code, _, err = run_cli("card", out)
    assert code == 0 and "unknown" in err and "--license" in err
    d = _card(out / "README.md").data.to_dict()
    assert "license" not in d
    code, _, err = run_cli("card", out, "--license", "mit")
    assert code == 0 and _card(out / "README.md").data.to_dict()["license"] == "mit"


def test_card_errors_are_one_line(tmp_path, run_cli):
    code, out, err = run_cli("card", tmp_path / "nope")
    assert code != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    (tmp_path / "empty").mkdir()
    code, out, err = run_cli("card", tmp_path / "empty")
    assert code != 0 and "quantkit.json" in err and len(err.strip().splitlines()) == 1


def test_card_links_the_run_report(tmp_path):
    from quantkit.card import render_card
    from quantkit.manifest import Manifest

    out = make_gguf_set(tmp_path / "gguf", evaluated=True)
    (out / "report.md").write_text("# report\n")
    (out / "report.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    m = Manifest.load(out)
    m.data["report"] = {"markdown": "report.md", "image": "report.png", "sha256": "00", "time": "x"}
    m.save()
    text = render_card(out, repo_id="acme/x").text
    assert "[report.md](report.md)" in text and "![quality versus size](report.png)" in text


def test_no_local_paths_in_card_or_published_manifest(tmp_path):
    from quantkit.card import render_card
    from quantkit.manifest import Manifest
    from quantkit.publish import public_manifest

    out = make_gguf_set(tmp_path / "gguf")
    m = Manifest.load(out)
    for rec in m.artifacts.values():
        rec["calibration"] = {"source": "file:/home/someone/private/notes.txt", "sha256": "ab" * 32}
        rec["params"]["work"] = str(tmp_path / "gguf" / ".quantkit-work")
    m.data["evaluation"] = {"base": {"id": "acme/x", "path": str(tmp_path / "base")}, "text": "builtin:eval"}
    m.save()
    text = render_card(out, repo_id="acme/x").text
    published = public_manifest(Manifest.load(out)).decode()
    for blob in (text, published):
        assert "/home/someone" not in blob and str(tmp_path) not in blob
    assert "notes.txt" in text and "notes.txt" in published
