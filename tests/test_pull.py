"""``quantkit pull`` / ``quantkit.hub.resolve_model`` against the local test Hub (real HTTP, real client)."""

from __future__ import annotations

import json
import socket

import numpy as np


def _model_folder(path, *, safetensors=True, pickle=False, extras=True, license="apache-2.0"):
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                                  "hidden_size": 8, "num_hidden_layers": 1}))
    (path / "generation_config.json").write_text('{"do_sample": false}')
    (path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}}')
    (path / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    (path / "README.md").write_text(f"---\nlicense: {license}\npipeline_tag: text-generation\n---\n# Tiny\n")
    (path / "LICENSE").write_text("Apache License 2.0 (test copy)\n")
    if safetensors:
        save_file({"w": np.arange(64, dtype=np.float32).reshape(8, 8)}, str(path / "model.safetensors"))
    if pickle:
        (path / "pytorch_model.bin").write_bytes(b"\x80\x04pickle-bytes-that-must-not-be-fetched")
    if extras:
        (path / "pytorch_model.bin").write_bytes(b"\x80\x04pickle-bytes-that-must-not-be-fetched")
        (path / "model.onnx").write_bytes(b"\x08\x07onnx")
        (path / "flax_model.msgpack").write_bytes(b"\x81msgpack")
        (path / "images").mkdir(exist_ok=True)
        (path / "images" / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
        (path / "onnx").mkdir(exist_ok=True)
        (path / "onnx" / "model_quantized.onnx").write_bytes(b"\x08\x07onnx")
    return path


def _files_under(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def _assert_one_line_error(code, out, err, token, *needles):
    assert code != 0
    assert "Traceback" not in err and "Traceback" not in out
    # progress bars (huggingface_hub's own, on stderr) aside, the error is exactly one line
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and "%|" not in ln]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    for n in needles:
        assert n.lower() in lines[0].lower(), lines[0]
    assert token not in out + err


def test_pull_resolves_revision_and_fetches_only_what_conversion_needs(hub_server, tmp_path, run_cli):
    from quantkit.hub import resolve_model

    sha = hub_server.seed("acme/tiny", _model_folder(tmp_path / "src"))
    src = resolve_model("acme/tiny", "main")
    assert src.sha == sha and len(sha) == 40
    assert src.id == "acme/tiny" and src.revision == "main" and src.license == "apache-2.0"
    assert src.manifest_base()["sha"] == sha
    got = _files_under(src.path)
    assert got == sorted(["LICENSE", "README.md", "config.json", "generation_config.json", "model.safetensors",
                          "tokenizer.json", "tokenizer_config.json"]), got
    # the remote still has the others; none reached the cache (blobs) either
    blobs = list((hub_server.hf_home / "hub").rglob("blobs/*"))
    assert len(blobs) == len(got)

    # a branch resolves to its own commit SHA, recorded in the JSON output
    new = hub_server.seed("acme/tiny", files={"config.json": (tmp_path / "src" / "config.json").read_text()
                                              .replace('"hidden_size": 8', '"hidden_size": 16')})
    assert new != sha
    code, out, err = run_cli("pull", "acme/tiny", "--revision", sha, "--json")
    assert code == 0, err
    rec = json.loads(out)
    assert rec["sha"] == sha and rec["revision"] == sha and rec["id"] == "acme/tiny"
    code, out, err = run_cli("pull", "acme/tiny", "--json")
    assert code == 0, err
    assert json.loads(out)["sha"] == new
    assert json.loads((__import__("pathlib").Path(json.loads(out)["path"]) / "config.json").read_text())[
        "hidden_size"] == 16
    assert hub_server.token not in out + err


def test_pull_pickle_only_repo_refused_unless_allowed(hub_server, tmp_path, run_cli):
    hub_server.seed("acme/old", _model_folder(tmp_path / "src", safetensors=False, pickle=True, extras=False))
    code, out, err = run_cli("pull", "acme/old")
    _assert_one_line_error(code, out, err, hub_server.token, "pickle", "--allow-pickle")
    assert not list((hub_server.hf_home / "hub").rglob("*.bin"))
    code, out, err = run_cli("pull", "acme/old", "--allow-pickle", "--json")
    assert code == 0, err
    from pathlib import Path

    assert (Path(json.loads(out)["path"]) / "pytorch_model.bin").is_file()


def test_pull_errors_are_one_clear_line(hub_server, tmp_path, run_cli):
    folder = _model_folder(tmp_path / "src", extras=False)
    hub_server.seed("acme/private", folder, private=True)
    hub_server.seed("meta-llama/Gated", folder, gated="manual")

    code, out, err = run_cli("pull", "acme/does-not-exist")
    _assert_one_line_error(code, out, err, hub_server.token, "acme/does-not-exist", "not found")

    code, out, err = run_cli("pull", "acme/tiny-nope", "--revision", "v9")
    _assert_one_line_error(code, out, err, hub_server.token, "not found")

    hub_server.seed("acme/tiny", folder)
    code, out, err = run_cli("pull", "acme/tiny", "--revision", "no-such-branch")
    _assert_one_line_error(code, out, err, hub_server.token, "no revision", "no-such-branch")

    # gated: alice has no access -> says how to get it
    code, out, err = run_cli("pull", "meta-llama/Gated")
    _assert_one_line_error(code, out, err, hub_server.token, "gated", "accept")
    hub_server.grant("meta-llama/Gated", hub_server.user)
    code, out, err = run_cli("pull", "meta-llama/Gated")
    assert code == 0, err

    # private: the owner's token reads it; another user's does not
    code, out, err = run_cli("pull", "acme/private")
    _assert_one_line_error(code, out, err, hub_server.token, "not found", "private")
    hub_server.add_user("carol", token=None, orgs=["acme"])
    carol = [t for t, u in hub_server.state.users.items() if u["name"] == "carol"][0]
    from quantkit.hub import resolve_model

    assert resolve_model("acme/private", token=carol).sha == hub_server.head("acme/private")


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_pull_without_network_is_one_line(hub_server, tmp_path, run_cli_subprocess):
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}", "HF_HUB_ETAG_TIMEOUT": "2",
           "HF_HUB_DOWNLOAD_TIMEOUT": "2"}
    code, out, err = run_cli_subprocess("pull", "acme/tiny", env=env, timeout=120)
    _assert_one_line_error(code, out, err, hub_server.token, "cannot reach the hub")


def test_pull_bad_token_is_one_line(hub_server, tmp_path, run_cli, monkeypatch):
    hub_server.seed("acme/tiny", _model_folder(tmp_path / "src", extras=False))
    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 34)
    code, out, err = run_cli("pull", "acme/tiny")
    _assert_one_line_error(code, out, err, "hf_" + "x" * 34)
    assert "invalid" in err and "HF_TOKEN" in err


def test_pull_offline_uses_the_cached_snapshot(hub_server, tmp_path, run_cli, run_cli_subprocess):
    sha = hub_server.seed("acme/tiny", _model_folder(tmp_path / "src", extras=False))
    code, out, err = run_cli("pull", "acme/tiny", "--json")
    assert code == 0, err
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}", "HF_HUB_ETAG_TIMEOUT": "2"}
    code, out, err = run_cli_subprocess("pull", "acme/tiny", "--json", env=env, timeout=120)
    assert code == 0, err
    assert json.loads(out)["sha"] == sha
