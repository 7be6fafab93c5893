"""Bad input to `quantkit gguf` / `quantkit pull`: non-zero exit, ONE line saying what to do, no traceback."""

from __future__ import annotations

import json
import shutil

import pytest


def _one_line_error(code, out, err):
    assert code != 0
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err + out
    return lines[0]


@pytest.fixture()
def fake_arch_folder(tiny_llama, tmp_path):
    """A real model folder whose config names an architecture llama.cpp's converter does not know."""
    d = tmp_path / "weird-model"
    shutil.copytree(tiny_llama, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["TotallyNewForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_gguf_unknown_type_subprocess(tiny_llama, tmp_path, run_cli_subprocess):
    code, out, err = run_cli_subprocess("gguf", tiny_llama, "--types", "Q4_K_M,Q7_X", "--out", tmp_path / "o")
    line = _one_line_error(code, out, err)
    assert "unknown GGUF type 'Q7_X'" in line and "Q4_K_M" in line
    assert not (tmp_path / "o").exists()


def test_gguf_unsupported_architecture_subprocess(fake_arch_folder, tmp_path, run_cli_subprocess):
    code, out, err = run_cli_subprocess("gguf", fake_arch_folder, "--types", "Q8_0", "--out", tmp_path / "o")
    line = _one_line_error(code, out, err)
    assert "TotallyNewForCausalLM" in line and "not supported by llama.cpp's converter" in line


@pytest.mark.parametrize("case", ["missing", "no-config", "file", "iq-without-calibration", "bad-outtype",
                                  "no-types", "bad-threads", "bad-calibration"])
def test_gguf_bad_input(case, tiny_llama, tmp_path, run_cli):
    model, extra = str(tiny_llama), []
    types = "Q4_K_M"
    if case == "missing":
        model = str(tmp_path / "nope")
    elif case == "no-config":
        d = tmp_path / "empty"
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"")
        model = str(d)
    elif case == "file":
        f = tmp_path / "model.gguf"
        f.write_text("x")
        model = str(f)
    elif case == "iq-without-calibration":
        types = "IQ4_XS"
    elif case == "bad-outtype":
        extra = ["--outtype", "q4"]
    elif case == "no-types":
        types = " , "
    elif case == "bad-threads":
        extra = ["--threads", "0"]
    elif case == "bad-calibration":
        extra = ["--calibration", str(tmp_path / "missing.txt")]
    code, out, err = run_cli("gguf", model, "--types", types, "--out", tmp_path / "o", *extra)
    line = _one_line_error(code, out, err)
    expect = {"missing": "does not exist", "no-config": "no config.json", "file": "is a file",
              "iq-without-calibration": "--calibration", "bad-outtype": "--outtype",
              "no-types": "--types", "bad-threads": "--threads", "bad-calibration": "missing.txt"}[case]
    assert expect in line, line


def test_gguf_missing_types_option(tiny_llama, run_cli):
    code, out, err = run_cli("gguf", tiny_llama)
    line = _one_line_error(code, out, err)
    assert "--types" in line


@pytest.mark.unit
@pytest.mark.parametrize("case", ["missing", "no-config", "pickle-only", "revision-on-folder"])
def test_pull_bad_input(case, tmp_path, run_cli):
    args = []
    if case == "missing":
        model = tmp_path / "nope"
    elif case == "no-config":
        model = tmp_path / "empty"
        model.mkdir()
    elif case == "pickle-only":
        model = tmp_path / "pkl"
        model.mkdir()
        (model / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
        (model / "pytorch_model.bin").write_bytes(b"\x80")
    else:
        model = tmp_path
        args = ["--revision", "main"]
    code, out, err = run_cli("pull", model, *args)
    line = _one_line_error(code, out, err)
    expect = {"missing": "does not exist", "no-config": "no config.json", "pickle-only": "--allow-pickle",
              "revision-on-folder": "local folder"}[case]
    assert expect in line, line


_LEAVE_PROBE = """
import atexit, sys, threading, time
from pathlib import Path
from quantkit.cli import main
out = Path(sys.argv[1])
def late():  # a thread of the program's own, still working when the command returns
    time.sleep(0.5)
    (out / "thread").write_text("done")
threading.Thread(target=late).start()
atexit.register(lambda: (out / "atexit").write_text("ran"))
sys.stdout.write("buffered, never flushed by hand")
sys.argv = ["quantkit", *sys.argv[2:]]
main()
"""


@pytest.mark.unit
@pytest.mark.parametrize("args, code", [(["--version"], 0), (["no-such-command"], 2)])
def test_the_command_leaves_after_its_threads_and_exit_handlers(tmp_path, args, code):
    """`quantkit` leaves without the interpreter's teardown (cli._leave), but only after the program's own threads
    finished and its exit handlers ran, with stdout flushed and the command's exit code."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _LEAVE_PROBE, str(tmp_path), *args], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == code, r.stderr
    assert (tmp_path / "thread").read_text() == "done" and (tmp_path / "atexit").read_text() == "ran"
    assert r.stdout.startswith("buffered, never flushed by hand")
    assert "Traceback" not in r.stderr
