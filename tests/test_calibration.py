"""--calibration SPEC: every form parses and loads; every malformed form fails with one clear line."""

import json

import pytest

from quantkit.calibration import Calibration, load_calibration, parse_spec
from quantkit.errors import QuantkitError
from quantkit.texts import builtin_calibration_text, builtin_eval_text, text_sha256


@pytest.fixture(scope="module")
def tok(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, msg
    return msg


# -- builtin --------------------------------------------------------------------------------------

def test_builtin_default_is_offline_and_not_the_eval_text(tok):
    cal = load_calibration(None, tokenizer=tok, samples=8, seq_len=128)
    assert isinstance(cal, Calibration)
    assert cal.source == "builtin:pydoc-topics" and cal.kind == "builtin"
    assert len(cal.texts) == 8
    lens = [len(x) for x in tok(cal.texts, add_special_tokens=False)["input_ids"]]
    assert all(0 < n <= 128 for n in lens) and sum(lens) == cal.token_count
    assert cal.token_count > 8 * 64  # packed, not one line each
    assert cal.sha256 == text_sha256("\n\n".join(cal.texts))
    eval_text = builtin_eval_text()
    assert not any(t[:200] in eval_text for t in cal.texts)
    assert all(t[:100] in builtin_calibration_text() for t in cal.texts)
    # spread over the whole document, deterministic
    assert load_calibration("builtin", tokenizer=tok, samples=8, seq_len=128).sha256 == cal.sha256
    d = cal.as_dict()
    assert d["token_count"] == cal.token_count and d["sha256"] == cal.sha256 and d["samples"] == 8
    assert d["seq_len"] == 128 and d["source"] == "builtin:pydoc-topics"
    json.dumps(d)


@pytest.mark.unit
def test_builtin_without_tokenizer_packs_by_characters():
    cal = load_calibration(None, samples=4, seq_len=64)
    assert len(cal.texts) == 4 and cal.token_count is None
    assert all(len(t) <= 64 * 4 for t in cal.texts)


# -- text files -----------------------------------------------------------------------------------

def test_txt_split_into_packed_paragraph_samples(tmp_path, tok):
    paras = [f"Paragraph number {i} talks about topic {i % 7} in a few words." for i in range(200)]
    p = tmp_path / "cal.txt"
    p.write_text("\n\n".join(paras) + "\n")
    cal = load_calibration(str(p), tokenizer=tok, samples=5, seq_len=64)
    assert cal.kind == "text" and cal.source == f"file:{p.resolve()}"
    assert len(cal.texts) == 5
    lens = [len(x) for x in tok(cal.texts, add_special_tokens=False)["input_ids"]]
    assert all(32 < n <= 64 for n in lens), lens
    assert cal.texts[0].startswith("Paragraph number 0 ")
    # one huge paragraph is cut, never dropped
    p2 = tmp_path / "one.txt"
    p2.write_text("word " * 1000)
    cal2 = load_calibration(str(p2), tokenizer=tok, samples=100, seq_len=64)
    assert len(cal2.texts) > 10 and all(
        len(x) <= 64 for x in tok(cal2.texts, add_special_tokens=False)["input_ids"])


# -- jsonl ----------------------------------------------------------------------------------------

def test_jsonl_text_and_messages(tmp_path, tok):
    p = tmp_path / "cal.jsonl"
    rows = [{"text": f"Sample {i}: the quick brown fox jumps over the lazy dog."} for i in range(3)]
    rows.append({"messages": [{"role": "user", "content": "What is 2+2?"},
                              {"role": "assistant", "content": "4."}]})
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    cal = load_calibration(str(p), tokenizer=tok, samples=10, seq_len=128)
    assert cal.kind == "jsonl" and len(cal.texts) == 4
    assert cal.texts[0].startswith("Sample 0")
    # SmolLM2's tokenizer has a chat template: its markers appear in the rendered sample
    assert tok.chat_template and "<|im_start|>" in cal.texts[3] and "What is 2+2?" in cal.texts[3]
    assert cal.chat_template == "model"
    plain = load_calibration(str(p), samples=10, seq_len=128)
    assert plain.texts[3] == "user: What is 2+2?\nassistant: 4." and plain.chat_template == "plain"
    assert load_calibration(str(p), tokenizer=tok, samples=2, seq_len=128).texts == cal.texts[:2]


# -- hub ------------------------------------------------------------------------------------------

@pytest.mark.unit
def test_hub_spec_parsing_without_network():
    s = parse_spec("hub:Salesforce/wikitext:wikitext-2-raw-v1:train:text")
    assert (s.kind, s.dataset, s.config, s.split, s.column) == (
        "hub", "Salesforce/wikitext", "wikitext-2-raw-v1", "train", "text")
    s = parse_spec("hub:HuggingFaceH4/ultrachat_200k:train_sft:messages")
    assert (s.dataset, s.config, s.split, s.column) == ("HuggingFaceH4/ultrachat_200k", None, "train_sft",
                                                        "messages")
    assert s.source == "hub:HuggingFaceH4/ultrachat_200k:train_sft:messages"
    assert parse_spec("hub:wikitext:wikitext-2-raw-v1:train:text").dataset == "wikitext"
    assert parse_spec(None).kind == parse_spec("builtin").kind == "builtin"


def test_hub_form_loads_a_local_dataset_folder(tmp_path, tok):
    d = tmp_path / "ds"
    d.mkdir()
    (d / "train.jsonl").write_text("\n".join(json.dumps({"body": f"Row {i} of a small dataset."})
                                             for i in range(50)) + "\n")
    cal = load_calibration(f"hub:{d}:train:body", tokenizer=tok, samples=3, seq_len=64)
    assert cal.kind == "hub" and 1 <= len(cal.texts) <= 3 and cal.texts[0].startswith("Row 0")
    with pytest.raises(QuantkitError) as e:
        load_calibration(f"hub:{d}:train:text", tokenizer=tok, samples=3, seq_len=64)
    assert "no column 'text'" in one_line(e) and "body" in str(e.value)


# -- malformed specs ------------------------------------------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize("spec, words", [
    ("hub:onlyname", "not of the form"),
    ("hub:org/name:train", "not of the form"),
    ("hub:a:b:c:d:e", "not of the form"),
    ("hub:org/name::train:text", "empty field"),
    ("hub:org/na me:train:text", "not a Hub dataset id"),
])
def test_bad_hub_specs(spec, words):
    with pytest.raises(QuantkitError) as e:
        parse_spec(spec)
    assert words in one_line(e)


def test_malformed_files(tmp_path, tok):
    cases = []
    cases.append((str(tmp_path / "missing.txt"), "does not exist"))
    (tmp_path / "empty.txt").write_text("  \n\n")
    cases.append((str(tmp_path / "empty.txt"), "is empty"))
    (tmp_path / "empty.jsonl").write_text("")
    cases.append((str(tmp_path / "empty.jsonl"), "is empty"))
    (tmp_path / "unknown.jsonl").write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    cases.append((str(tmp_path / "unknown.jsonl"), "line 2 has no 'text' or 'messages' field (fields: prompt)"))
    (tmp_path / "broken.jsonl").write_text('{"text": "a"\n')
    cases.append((str(tmp_path / "broken.jsonl"), "line 1 is not valid JSON"))
    (tmp_path / "badmsg.jsonl").write_text(json.dumps({"messages": "hello"}) + "\n")
    cases.append((str(tmp_path / "badmsg.jsonl"), "'messages' must be a non-empty list"))
    (tmp_path / "data.csv").write_text("a,b\n")
    cases.append((str(tmp_path / "data.csv"), "unsupported type '.csv'"))
    cases.append((str(tmp_path), "is a folder"))
    for spec, words in cases:
        with pytest.raises(QuantkitError) as e:
            load_calibration(spec, tokenizer=tok, samples=4, seq_len=64)
        assert words in one_line(e), (spec, str(e.value))
    with pytest.raises(QuantkitError) as e:
        load_calibration(None, samples=0)
    assert "--samples" in one_line(e)
