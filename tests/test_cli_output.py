"""What the CLI writes where: with ``--json`` stdout is the JSON alone, whatever the engines print while they import
or load (Python, C libraries, child processes); messages go through one logging handler on stderr (-q / -v)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from quant_folders import make_gguf_set


def _cli(*args, cwd=None, timeout=1200):
    env = {**os.environ, "QUANTKIT_NO_PROGRESS": "1"}
    r = subprocess.run([sys.executable, "-m", "quantkit.cli", *map(str, args)], capture_output=True, text=True,
                       env=env, cwd=cwd, timeout=timeout)
    return r.returncode, r.stdout, r.stderr


def _only_json(code, out, err):
    assert code == 0, err[-3000:]
    assert out.lstrip().startswith("{"), out[:500]  # nothing ahead of the JSON
    return json.loads(out)  # and nothing after it


@pytest.fixture(scope="module")
def variants(tiny_llama, tmp_path_factory):
    """A GGUF (through `quantkit gguf --json` in a child process), a classic GPTQ and a compressed-tensors GPTQ folder
    of the tiny Llama."""
    from quantkit.gptq import quantize_gptq

    root = tmp_path_factory.mktemp("json-variants")
    res = _only_json(*_cli("gguf", tiny_llama, "--types", "Q8_0", "--out", root / "gguf", "--json"))
    gguf = next(root.joinpath("gguf").glob("*Q8_0.gguf"))
    assert res["folder"] == str(root / "gguf")
    kw = dict(samples=4, seq_len=64, group_size=32, device="cpu")
    classic = quantize_gptq(str(tiny_llama), fmt="classic", out=root / "gptq", **kw).folder
    ct = quantize_gptq(str(tiny_llama), fmt="compressed-tensors", out=root / "gptq-ct", **kw).folder
    return {"gguf": gguf, "classic": classic, "compressed-tensors": ct}


@pytest.mark.parametrize("fmt", ["gguf", "classic", "compressed-tensors"])
def test_eval_json_is_clean_for_every_format(fmt, tiny_llama, variants, tmp_path):
    """gptqmodel prints a banner and log lines to stdout when it loads, llama.cpp logs from C, llm-compressor through
    loguru: none of it may reach stdout (a fresh process each, so import-time output happens here)."""
    code, out, err = _cli("eval", tiny_llama, variants[fmt], "--ctx", 32, "--max-tokens", 128, "--threads", 2,
                          "--no-write", "--json", cwd=tmp_path)
    if fmt == "gguf" and code == -signal.SIGILL:
        pytest.skip("llama.cpp's build dies with SIGILL on this CPU when it evaluates (environment, not quantkit)")
    rep = _only_json(code, out, err)
    assert rep["base"]["path"] == str(tiny_llama) and len(rep["variants"]) == 1


def test_eval_table_is_all_stdout_holds(tiny_llama, variants, tmp_path):
    """Without --json too: loading a classic GPTQ folder (gptqmodel prints its banner and kernel choice on stdout)
    leaves stdout to the table; the engines' output goes to stderr."""
    code, out, err = _cli("eval", tiny_llama, variants["classic"], "--ctx", 32, "--max-tokens", 128, "--threads", 2,
                          "--no-write", cwd=tmp_path)
    assert code == 0, err[-3000:]
    lines = out.strip().splitlines()
    assert lines[0].startswith("text: ") and lines[2].startswith("variant ") and "KLD" in lines[2], out[:500]
    assert "GPT-QModel" not in out and "GPT-QModel" in err  # the banner is there, on stderr
    assert len(lines) == 7 and lines[6].startswith("note: ")  # text, blank, header, rule, base, variant, note


def test_json_error_keeps_stdout_empty(tmp_path, run_cli):
    code, out, err = run_cli("pull", tmp_path / "missing", "--json")
    assert code != 0 and out == "" and err.startswith("error: ")


def test_messages_go_through_logging_quiet_and_verbose(hub_server, tmp_path, run_cli):
    out = make_gguf_set(tmp_path / "gguf", license="llama3.1", base_id="meta-llama/Llama-3.1-8B-Instruct",
                        model_name="Llama-3.1-8B-Instruct")
    code, stdout, err = run_cli("push", out, "--repo", "alice-org/Tiny-8B-GGUF", "--json")
    assert code == 0, err
    json.loads(stdout)
    assert "warning: " in err and "warning: " not in stdout and "uploading" not in err  # upload line: debug

    code, stdout, err = run_cli("-q", "push", out, "--repo", "alice-org/Tiny-8B-GGUF", "--prune")
    assert code == 0, err
    assert "warning: " not in err  # -q: errors only

    code, stdout, err = run_cli("-v", "push", out, "--repo", "alice-org/Tiny-8B-GGUF", "--dry-run")
    assert code == 0, err
    assert "remote file(s)" in err and "warning: " in err  # -v: debug lines too
    assert "[dry run]" in stdout and "remote file(s)" not in stdout
