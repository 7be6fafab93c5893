"""GGUF path end to end: real conversions with llama.cpp's converter, real quantisation, real loads.

Tiny 2-layer random models (llama, qwen2; mistral in the slow set) keep the default set to about a minute and
a half; SmolLM2-135M runs in the slow set. Logit tolerances are for *random* weights, which quantise worse than
trained ones: what is asserted is "F32 matches, Q8_0 very close, Q4_K_M close and worse than Q8_0".
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from quantkit.errors import QuantkitError
from quantkit.formats import GGUF_TYPES
from quantkit.gguf import WORK_DIR, artifact_name, imatrix_method, quantize_gguf
from quantkit.ggufio import load_imatrix, normalize_types, read_gguf_info
from quantkit.manifest import Manifest
from quantkit.util import sha256_file

SENTENCE = "The quick brown fox jumps over the lazy dog, and then it runs back into the forest to find"


# -- shared runs (one conversion per architecture for the whole module) -------------------------

@pytest.fixture(scope="module")
def llama_set(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "llama"
    return quantize_gguf(str(tiny_llama), ["Q8_0", "Q4_K_M", "F32"], out, threads=2)


@pytest.fixture(scope="module")
def qwen2_set(tiny_qwen2, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "qwen2"
    return quantize_gguf(str(tiny_qwen2), ["Q8_0", "Q4_K_M"], out, threads=2)


@pytest.fixture(scope="module")
def small_calibration(tmp_path_factory, calibration_text) -> Path:
    p = tmp_path_factory.mktemp("calib") / "notes.txt"
    p.write_text(calibration_text[:9000], encoding="utf-8")  # ~2k tokens: a few 512-token chunks
    return p


@pytest.fixture(scope="module")
def imatrix_set(llama_set, tiny_llama, small_calibration, tmp_path_factory):
    """The llama set again with --calibration (the default method: llama-imatrix when it was built)."""
    folder = _copy_set(llama_set, tmp_path_factory.mktemp("gguf") / "imx")
    return quantize_gguf(str(tiny_llama), ["Q4_K_M", "IQ4_XS"], folder, calibration=str(small_calibration))


def _copy_set(res, dest: Path) -> Path:
    shutil.copytree(res.folder, dest)
    return dest


def hf_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0].float().numpy()


def gguf_logits(path: Path, ids: list[int], text: str | None = None):
    """llama.cpp's logits for ``ids`` (and its own tokenisation of ``text``)."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=128, n_batch=128, logits_all=True, verbose=False, n_threads=2)
    try:
        toks = llm.tokenize(text.encode(), add_bos=True, special=False) if text else None
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)], dtype=np.float32), toks
    finally:
        llm.close()


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def mean_kl(ref: np.ndarray, got: np.ndarray) -> float:
    """Mean over positions of KL(softmax(ref) || softmax(got))."""
    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    p, q = log_softmax(ref.astype(np.float64)), log_softmax(got.astype(np.float64))
    return float((np.exp(p) * (p - q)).sum(-1).mean())


# -- types, files, manifest ---------------------------------------------------------------------

def test_normalize_types():
    assert normalize_types("q4_k_m, Q8_0,q4_k_m") == ["Q4_K_M", "Q8_0"]
    assert normalize_types(["Q4_K", "q5_k"]) == ["Q4_K_M", "Q5_K_M"]
    for t in ("F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q3_K_M", "Q2_K", "IQ4_XS"):
        assert t in GGUF_TYPES
    with pytest.raises(QuantkitError, match="unknown GGUF type 'Q9_K'"):
        normalize_types("Q4_K_M,Q9_K")
    import llama_cpp

    for name, row in GGUF_TYPES.items():  # our table agrees with the compiled library's enum
        const = "LLAMA_FTYPE_ALL_F32" if name == "F32" else f"LLAMA_FTYPE_MOSTLY_{name}"
        if hasattr(llama_cpp, const):
            assert getattr(llama_cpp, const) == row.ftype, name


@pytest.mark.parametrize("which", ["llama", "qwen2"])
def test_files_types_and_manifest(which, request):
    import gguf

    res = request.getfixturevalue(f"{which}_set")
    name = res.manifest.base["model_name"]
    assert res.converted and sorted(res.built) == sorted(res.artifacts)
    assert res.artifacts[:2] == [artifact_name(name, "Q8_0"), artifact_name(name, "Q4_K_M")]
    expect = {"Q8_0": {"Q8_0"}, "Q4_K_M": {"Q4_K", "Q6_K"}, "F32": {"F32"}}
    for art in res.artifacts:
        rec = res.manifest.artifacts[art]
        path = res.folder / rec["path"]
        assert path.name == art and path.is_file()
        info = read_gguf_info(path)  # quantkit's fast header reader
        assert info["file_type"] == rec["type"] and info["architecture"] == which
        assert expect[rec["type"]] <= set(info["tensor_types"]), (rec["type"], info["tensor_types"])
        if rec["type"] == "Q4_K_M":  # gguf's own reader (slow on a 50k-150k vocabulary: once per model)
            r = gguf.GGUFReader(str(path))
            assert int(r.fields["general.file_type"].contents()) == GGUF_TYPES["Q4_K_M"].ftype
            types = Counter(t.tensor_type.name for t in r.tensors)
            assert {"Q4_K", "Q6_K"} <= set(types) and dict(types) == info["tensor_types"]
            assert sum(int(t.n_elements) for t in r.tensors) == info["params"]
            assert sum(int(t.n_bytes) for t in r.tensors) == info["tensor_bytes"]
            del r
        # manifest record
        assert rec["format"] == "gguf" and rec["method"] == "gguf"
        assert rec["files"][0]["sha256"] == sha256_file(path) and rec["size"] == path.stat().st_size
        assert rec["params"]["outtype"] == "f32" and rec["params"]["imatrix"] is None
        assert rec["tools"]["llama-cpp-python"] and rec["tools"]["gguf"]
        assert 4 < rec["bits_per_weight"] <= 32.5 and rec["seconds"] > 0
        assert (path.stat().st_mode & 0o044) == 0o044  # readable by others, like any published file
    m = Manifest.load(res.folder, create=False)
    conv = m.data["intermediates"]["convert"]
    assert conv["path"].startswith(WORK_DIR + "/") and conv["file_type"] == "F32"
    assert (res.folder / conv["path"]).is_file()
    assert m.base["sha"].startswith("local-") and m.base["architecture"]
    assert not [p for p in res.folder.rglob("*.partial")]
    rows = res.table_rows()
    assert [r[0] for r in rows] == [m.artifacts[a]["type"] for a in res.artifacts]
    json.dumps(res.to_json())


@pytest.mark.parametrize("which", ["llama", "qwen2"])
def test_logits_close_to_hf(which, request):
    from transformers import AutoTokenizer

    res = request.getfixturevalue(f"{which}_set")
    model_dir = Path(res.manifest.base["local_path"])
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tok(SENTENCE)["input_ids"]
    ref = hf_logits(model_dir, ids)
    inter = res.folder / res.manifest.data["intermediates"]["convert"]["path"]
    f32, toks = gguf_logits(inter, ids, SENTENCE)
    assert toks == ids, "llama.cpp tokenises the sentence like transformers"
    assert rel_err(f32, ref) < 0.01
    errs = {}
    for t in ("Q8_0", "Q4_K_M"):
        got, _ = gguf_logits(res.folder / artifact_name(res.manifest.base["model_name"], t), ids)
        errs[t] = rel_err(got, ref)
        top1 = float((got.argmax(-1) == ref.argmax(-1)).mean())
        if t == "Q8_0":
            assert errs[t] < 0.06 and top1 >= 0.8, (t, errs[t], top1)
        else:
            assert errs[t] < 0.4 and top1 >= 0.3, (t, errs[t], top1)
    assert errs["Q8_0"] < errs["Q4_K_M"]


# -- resume ---------------------------------------------------------------------------------------

def test_llama_cpp_token_ids_are_kept_per_vocabulary(llama_set, qwen2_set, monkeypatch):
    """engines.llama_cpp.gguf_tokenize starts llama.cpp in a child once per vocabulary and text: another type of the
    same model re-uses the ids (same tokenizer metadata), another model does not; the ids are llama.cpp's own."""
    import subprocess
    import uuid

    from llama_cpp import Llama

    from quantkit.engines.llama_cpp import gguf_tokenize

    text = f"def f(x):\n    return x ** 2  # {uuid.uuid4().hex}"  # new to the cache
    children = []
    real_run = subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: children.append(a) or real_run(*a, **k))
    paths = {n: llama_set.folder / llama_set.manifest.artifacts[n]["path"] for n in llama_set.artifacts}
    q8, q4 = (next(p for n, p in paths.items() if t in n) for t in ("Q8_0", "Q4_K_M"))
    ids8, err = gguf_tokenize(q8, text)
    assert err is None and len(children) == 1
    ids4, _ = gguf_tokenize(q4, text)
    assert ids4 == ids8 and len(children) == 1  # the same vocabulary: no second child
    vocab = Llama(model_path=str(q4), vocab_only=True, verbose=False)
    assert ids8 == vocab.tokenize(text.encode(), add_bos=False, special=False)
    vocab.close()
    other = qwen2_set.folder / next(iter(qwen2_set.manifest.artifacts.values()))["path"]
    ids_q, _ = gguf_tokenize(other, text)
    assert len(children) == 2 and ids_q != ids8  # another vocabulary: its own child and its own ids


def test_resume_reuses_everything_and_rebuilds_a_deleted_variant(llama_set, tiny_llama, tmp_path):
    folder = _copy_set(llama_set, tmp_path / "resume")
    name = llama_set.manifest.base["model_name"]
    q4, q8 = folder / artifact_name(name, "Q4_K_M"), folder / artifact_name(name, "Q8_0")
    q4_mtime = q4.stat().st_mtime_ns

    again = quantize_gguf(str(tiny_llama), ["Q8_0", "Q4_K_M", "F32"], folder)
    assert not again.converted and again.built == [] and len(again.reused) == 3
    q8.unlink()
    third = quantize_gguf(str(tiny_llama), ["Q8_0", "Q4_K_M"], folder)
    assert not third.converted and third.built == [q8.name] and third.reused == [q4.name]
    assert q8.is_file() and q4.stat().st_mtime_ns == q4_mtime
    hist = Manifest.load(folder, create=False).data["history"]
    assert sum(h["stage"] == "gguf.convert" for h in hist) == 1  # the copy's one conversion, never again
    assert [h["artifact"] for h in hist if h["stage"] == "gguf.quantize"][-1] == q8.name

    # a variant whose bytes changed is caught by its sha256 and rebuilt from the kept intermediate
    with open(q4, "r+b") as f:
        f.seek(-16, os.SEEK_END)
        f.write(b"\0" * 16)
    fourth = quantize_gguf(str(tiny_llama), ["Q4_K_M"], folder)
    assert not fourth.converted and fourth.built == [q4.name]
    assert Manifest.load(folder).artifact_is_intact(q4.name)


def test_other_base_in_same_folder_refused(llama_set, tiny_qwen2, tmp_path):
    folder = _copy_set(llama_set, tmp_path / "mixed")
    with pytest.raises(QuantkitError, match="use another --out folder"):
        quantize_gguf(str(tiny_qwen2), ["Q8_0"], folder)


# -- importance matrix ----------------------------------------------------------------------------

def test_iq_type_needs_calibration(tiny_llama, tmp_path):
    assert GGUF_TYPES["IQ4_XS"].imatrix
    with pytest.raises(QuantkitError, match="IQ4_XS need an importance matrix"):
        quantize_gguf(str(tiny_llama), ["Q4_K_M", "IQ4_XS"], tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_imatrix_from_calibration_text(llama_set, imatrix_set, small_calibration):
    res, folder = imatrix_set, imatrix_set.folder
    name = llama_set.manifest.base["model_name"]
    plain_sha = llama_set.manifest.artifacts[artifact_name(name, "Q4_K_M")]["files"][0]["sha256"]
    assert not res.converted  # the intermediate is re-used for the imatrix and both types
    assert res.imatrix == folder / f"{name}.imatrix" and res.imatrix.is_file()
    m = Manifest.load(folder, create=False)
    imx = m.data["intermediates"]["imatrix"]
    assert imx["method"] == imatrix_method() and imx["entries"] > 0
    assert imx["calibration"]["source"] == f"file:{small_calibration}"
    data, meta = load_imatrix(res.imatrix)
    assert "blk.0.attn_q.weight" in data and meta["chunk_count"] >= 2
    for t in ("Q4_K_M", "IQ4_XS"):
        rec = m.artifacts[artifact_name(name, t)]
        assert rec["params"]["imatrix"]["sha256"] == imx["sha256"]
        assert rec["calibration"]["sha256"] == imx["calibration"]["sha256"]
        info = read_gguf_info(folder / rec["path"])
        assert info["imatrix"]["entries_count"] == imx["entries"]
        assert info["imatrix"]["dataset"] == f"file:{small_calibration}"
    assert m.artifacts[artifact_name(name, "Q4_K_M")]["files"][0]["sha256"] != plain_sha  # imatrix changed it
    assert "IQ4_XS" in read_gguf_info(folder / artifact_name(name, "IQ4_XS"))["tensor_types"]

    # same calibration again: nothing to do; the imatrix is re-used too
    again = quantize_gguf(m.base["local_path"], ["Q4_K_M", "IQ4_XS"], folder, calibration=str(small_calibration))
    assert again.built == [] and not again.converted
    hist = Manifest.load(folder, create=False).data["history"]
    assert sum(h["stage"] == "gguf.imatrix" for h in hist) == 1


def test_torch_imatrix_fallback_agrees_with_llama_imatrix(imatrix_set, tiny_llama, small_calibration, tmp_path,
                                                          monkeypatch):
    folder = _copy_set(imatrix_set, tmp_path / "torch-imx")
    monkeypatch.setenv("QUANTKIT_IMATRIX", "torch")
    res = quantize_gguf(str(tiny_llama), ["Q4_K_M"], folder, calibration=str(small_calibration))
    m = Manifest.load(folder, create=False)
    assert m.data["intermediates"]["imatrix"]["method"] == "torch" and not res.converted
    assert res.built == res.artifacts  # another method = another imatrix = the variant is rebuilt
    assert m.artifacts[res.artifacts[0]]["params"]["imatrix"]["method"] == "torch"
    torch_imx, _ = load_imatrix(res.imatrix)
    if imatrix_set.manifest.data["intermediates"]["imatrix"]["method"] != "llama-imatrix":
        pytest.skip("llama.cpp's tools were not built: nothing to compare the torch imatrix with")
    llama_imx, _ = load_imatrix(imatrix_set.imatrix)
    assert sorted(torch_imx) == sorted(llama_imx)
    for k in llama_imx:
        assert np.corrcoef(torch_imx[k], llama_imx[k])[0, 1] > 0.9, k


# -- slow: a third architecture, a real 135M model ------------------------------------------------

@pytest.mark.slow
def test_mistral_end_to_end(tiny_mistral, tmp_path):
    from transformers import AutoTokenizer

    res = quantize_gguf(str(tiny_mistral), ["Q8_0", "Q4_K_M"], tmp_path / "mistral")
    tok = AutoTokenizer.from_pretrained(str(tiny_mistral))
    ids = tok(SENTENCE)["input_ids"]
    ref = hf_logits(tiny_mistral, ids)
    got, toks = gguf_logits(res.paths()[0], ids, SENTENCE)
    assert toks == ids and rel_err(got, ref) < 0.06
    assert read_gguf_info(res.paths()[1])["tensor_types"].keys() >= {"Q4_K", "Q6_K"}


@pytest.mark.slow
def test_smollm2_end_to_end(smollm2_hf, tmp_path):
    from transformers import AutoTokenizer

    res = quantize_gguf(str(smollm2_hf), ["Q8_0", "Q4_K_M"], tmp_path / "smol", outtype="f16")
    assert res.manifest.data["intermediates"]["convert"]["file_type"] == "F16"
    tok = AutoTokenizer.from_pretrained(str(smollm2_hf))
    ids = tok(SENTENCE)["input_ids"]
    ref = hf_logits(smollm2_hf, ids)
    inter = res.folder / res.manifest.data["intermediates"]["convert"]["path"]
    assert rel_err(gguf_logits(inter, ids)[0], ref) < 0.01
    errs, kls = {}, {}
    for path in res.paths():
        got, toks = gguf_logits(path, ids, SENTENCE)
        assert toks == ids
        t = read_gguf_info(path)["file_type"]
        errs[t], kls[t] = rel_err(got, ref), mean_kl(ref, got)
        top1 = float((got.argmax(-1) == ref.argmax(-1)).mean())
        assert top1 >= (0.8 if t == "Q8_0" else 0.6), (t, top1)
    # measured here: Q8_0 rel 0.05-0.06 / KL 0.01, Q4_K_M rel 0.18 / KL 0.12 (576-wide rows: some Q5_0 fallbacks)
    assert errs["Q8_0"] < 0.1 and kls["Q8_0"] < 0.03, (errs, kls)
    assert errs["Q4_K_M"] < 0.3 and kls["Q4_K_M"] < 0.3, (errs, kls)
    assert errs["Q8_0"] < errs["Q4_K_M"] and kls["Q8_0"] < kls["Q4_K_M"]
