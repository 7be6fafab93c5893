"""``quantkit push`` against the local test Hub (tests/hubserver.py): real HTTP, the real huggingface_hub client."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from quant_folders import make_awq_folder, make_gguf_set, tree_files


def _one_line_error(code, out, err, token):
    assert code != 0
    assert "Traceback" not in out + err
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and "%|" not in ln]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert token not in out + err
    return lines[0]


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _no_token_anywhere(token: str, *folders: Path, texts=()):
    for t in texts:
        assert token not in t
    for folder in folders:
        for p in folder.rglob("*"):
            if p.is_file():
                assert token.encode() not in p.read_bytes(), p


def test_push_gguf_then_download_back(hub_server, tmp_path, run_cli):
    from huggingface_hub import HfApi, ModelCard, snapshot_download

    out = make_gguf_set(tmp_path / "gguf", evaluated=True)
    code, stdout, err = run_cli("push", out, "--repo", "alice-org/TinyLlama-Chat-GGUF", "--json")
    assert code == 0, err
    res = json.loads(stdout)
    assert res["created"] and res["private"] and res["uploaded"] == 4 and res["commit"] == hub_server.head(
        "alice-org/TinyLlama-Chat-GGUF")

    remote = hub_server.files("alice-org/TinyLlama-Chat-GGUF")
    assert sorted(remote) == [".gitattributes", "README.md", "TinyLlama-Chat-Q4_K_M.gguf",
                              "TinyLlama-Chat-Q8_0.gguf", "quantkit.json"]  # no .quantkit-work/, F16 or imatrix
    assert hub_server.repo("alice-org/TinyLlama-Chat-GGUF").private
    assert hub_server.counts["commit"] == 1  # one commit with everything

    snap = Path(snapshot_download("alice-org/TinyLlama-Chat-GGUF"))
    for name in ("TinyLlama-Chat-Q4_K_M.gguf", "TinyLlama-Chat-Q8_0.gguf", "README.md"):
        assert _sha(snap / name) == _sha(out / name)
    rec = {a["path"]: a["files"][0]["sha256"] for a in json.loads((out / "quantkit.json").read_text())[
        "artifacts"].values()}
    for name, sha in rec.items():
        assert _sha(snap / name) == sha

    card = ModelCard.load("alice-org/TinyLlama-Chat-GGUF")
    d = card.data.to_dict()
    assert d["base_model"] == "acme/TinyLlama-Chat" and d["base_model_relation"] == "quantized"
    assert d["license"] == "apache-2.0" and "gguf" in d["tags"] and d["library_name"] == "gguf"
    assert d["quantized_by"] == "alice"
    info = HfApi().model_info("alice-org/TinyLlama-Chat-GGUF")
    assert info.card_data["base_model"] == "acme/TinyLlama-Chat"

    # the remote manifest: no local paths, no push records; the local one records the push
    remote_manifest = json.loads(remote["quantkit.json"])
    assert "pushes" not in remote_manifest and str(tmp_path) not in remote["quantkit.json"].decode()
    local = json.loads((out / "quantkit.json").read_text())
    push = local["pushes"][-1]
    assert push["repo"] == "alice-org/TinyLlama-Chat-GGUF" and push["commit"] == res["commit"]
    assert push["private"] is True and push["url"].endswith("/alice-org/TinyLlama-Chat-GGUF")

    # private: invisible without a token
    from huggingface_hub.errors import RepositoryNotFoundError

    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=False).model_info("alice-org/TinyLlama-Chat-GGUF")
    with pytest.raises(Exception):  # noqa: B017  whichever error: what matters is nothing was downloaded
        snapshot_download("alice-org/TinyLlama-Chat-GGUF", token=False, cache_dir=tmp_path / "anon")
    assert not list((tmp_path / "anon").rglob("*.gguf"))


def test_push_awq_folder_public(hub_server, tmp_path, run_cli):
    from huggingface_hub import HfApi, ModelCard, snapshot_download

    out = make_awq_folder(tmp_path / "awq")
    code, stdout, err = run_cli("push", out, "--repo", "alice/TinyLlama-Chat-AWQ", "--public")
    assert code == 0, err
    assert "alice/TinyLlama-Chat-AWQ" in stdout
    assert not hub_server.repo("alice/TinyLlama-Chat-AWQ").private
    snap = Path(snapshot_download("alice/TinyLlama-Chat-AWQ", token=False))  # public: no token needed
    local = tree_files(out)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "README.md"):
        assert _sha(snap / name) == local[name]
    assert not (snap / ".quantkit-work").exists()
    assert json.loads((snap / "config.json").read_text())["quantization_config"]["quant_method"] == "awq"
    d = ModelCard.load("alice/TinyLlama-Chat-AWQ").data.to_dict()
    assert "awq" in d["tags"] and d["library_name"] == "transformers"
    assert HfApi(token=False).model_info("alice/TinyLlama-Chat-AWQ").sha == hub_server.head(
        "alice/TinyLlama-Chat-AWQ")


def test_repush_is_a_noop_changes_replace_and_prune(hub_server, tmp_path, run_cli):
    from quant_folders import _write_gguf

    from quantkit.manifest import Manifest, file_record

    repo = "alice-org/Tiny-GGUF"
    out = make_gguf_set(tmp_path / "gguf", types=("Q8_0", "Q4_K_M", "Q2_K"))
    assert run_cli("push", out, "--repo", repo)[0] == 0
    head, puts, commits = hub_server.head(repo), hub_server.counts["lfs_put"], hub_server.counts["commit"]
    assert puts == 3

    code, stdout, err = run_cli("push", out, "--repo", repo, "--json")
    assert code == 0, err
    res = json.loads(stdout)
    assert res["uploaded"] == 0 and res["commit"] == head
    assert hub_server.head(repo) == head and hub_server.counts["lfs_put"] == puts
    assert hub_server.counts["commit"] == commits and hub_server.counts["preupload"] == 1

    # one variant rebuilt: only it goes up (plus the manifest, whose record changed)
    m = Manifest.load(out)
    _write_gguf(out / "TinyLlama-Chat-Q2_K.gguf", "TinyLlama-Chat", 10, seed=99, width=1700)
    m.update_artifact("TinyLlama-Chat-Q2_K.gguf", files=[file_record(out, out / "TinyLlama-Chat-Q2_K.gguf")],
                      size=(out / "TinyLlama-Chat-Q2_K.gguf").stat().st_size)
    m.save()
    res = json.loads(run_cli("push", out, "--repo", repo, "--json")[1])
    assert sorted(f["path"] for f in res["files"] if f["action"] == "upload") == [
        "README.md", "TinyLlama-Chat-Q2_K.gguf", "quantkit.json"]
    assert hub_server.counts["lfs_put"] == puts + 1
    assert hub_server.files(repo)["TinyLlama-Chat-Q2_K.gguf"] == (out / "TinyLlama-Chat-Q2_K.gguf").read_bytes()

    # a variant no longer produced stays remote unless --prune
    m = Manifest.load(out)
    del m.artifacts["TinyLlama-Chat-Q8_0.gguf"]
    m.save()
    (out / "TinyLlama-Chat-Q8_0.gguf").unlink()
    res = json.loads(run_cli("push", out, "--repo", repo, "--json")[1])
    assert {f["path"]: f["action"] for f in res["files"]}["TinyLlama-Chat-Q8_0.gguf"] == "keep"
    assert "TinyLlama-Chat-Q8_0.gguf" in hub_server.files(repo)
    code, stdout, err = run_cli("push", out, "--repo", repo, "--prune", "--dry-run")
    assert code == 0 and "delete" in stdout and "TinyLlama-Chat-Q8_0.gguf" in stdout
    assert "TinyLlama-Chat-Q8_0.gguf" in hub_server.files(repo)  # dry run touched nothing
    res = json.loads(run_cli("push", out, "--repo", repo, "--prune", "--json")[1])
    assert res["deleted"] == 1 and "TinyLlama-Chat-Q8_0.gguf" not in hub_server.files(repo)


@pytest.mark.parametrize("fault", ["commit", "lfs_put"])
def test_interrupted_upload_leaves_repo_unchanged(hub_server, tmp_path, run_cli, fault):
    repo = "alice-org/Tiny-GGUF"
    out = make_gguf_set(tmp_path / "gguf")
    assert run_cli("push", out, "--repo", repo)[0] == 0
    before_head, before_files = hub_server.head(repo), hub_server.files(repo)

    out2 = make_gguf_set(tmp_path / "gguf2", types=("Q8_0", "Q4_K_M", "Q6_K", "Q3_K_M"))
    hub_server.fail_next(fault)
    code, stdout, err = run_cli("push", out2, "--repo", repo)
    line = _one_line_error(code, stdout, err, hub_server.token)
    assert "nothing was changed" in line and "re-run" in line
    assert hub_server.head(repo) == before_head and hub_server.files(repo) == before_files
    assert "pushes" not in json.loads((out2 / "quantkit.json").read_text()) or not json.loads(
        (out2 / "quantkit.json").read_text())["pushes"]

    code, stdout, err = run_cli("push", out2, "--repo", repo, "--json")
    assert code == 0, err
    files = hub_server.files(repo)
    assert {"TinyLlama-Chat-Q6_K.gguf", "TinyLlama-Chat-Q3_K_M.gguf"} <= set(files)
    assert files["TinyLlama-Chat-Q6_K.gguf"] == (out2 / "TinyLlama-Chat-Q6_K.gguf").read_bytes()


def test_token_appears_nowhere(hub_server, tmp_path, run_cli_subprocess):
    token = hub_server.token
    out = make_gguf_set(tmp_path / "gguf", evaluated=True)
    texts = []
    for args in (["card", out, "--repo", "alice-org/T-GGUF"],
                 ["push", out, "--repo", "alice-org/T-GGUF", "--dry-run"],
                 ["push", out, "--repo", "alice-org/T-GGUF", "--json"],
                 ["push", out, "--repo", "alice-org/T-GGUF"],
                 ["push", out, "--repo", "bob-org/T-GGUF"],  # an error path too
                 ["pull", "alice-org/T-GGUF", "--json"]):
        code, o, e = run_cli_subprocess(*args, env={"HF_HUB_DISABLE_PROGRESS_BARS": "1"}, timeout=300)
        texts += [o, e]
    assert any("T-GGUF" in t for t in texts)
    _no_token_anywhere(token, out, tmp_path / "gguf-base", texts=texts)
    for content in hub_server.files("alice-org/T-GGUF").values():
        assert token.encode() not in content


def test_push_errors_are_one_clear_line(hub_server, tmp_path, run_cli, monkeypatch):
    token = hub_server.token
    out = make_gguf_set(tmp_path / "gguf")

    # somebody else's organisation
    line = _one_line_error(*run_cli("push", out, "--repo", "other-org/Tiny-GGUF"), token)
    assert "no write access" in line and "other-org" in line

    # a repo that already holds something else
    hub_server.seed("alice-org/Existing", files={"weights.bin": b"\x80\x04other", "notes.txt": "hello"})
    line = _one_line_error(*run_cli("push", out, "--repo", "alice-org/Existing"), token)
    assert "already exists with other content" in line
    assert sorted(hub_server.files("alice-org/Existing")) == [".gitattributes", "notes.txt", "weights.bin"]

    # a repo holding quants of another base
    other = make_gguf_set(tmp_path / "other", base_id="acme/Other-Model")
    assert run_cli("push", other, "--repo", "alice-org/Other-GGUF")[0] == 0
    line = _one_line_error(*run_cli("push", out, "--repo", "alice-org/Other-GGUF"), token)
    assert "acme/Other-Model" in line

    # read-only token
    reader = hub_server.add_user("reader", orgs=["alice-org"], role="read")
    monkeypatch.setenv("HF_TOKEN", reader)
    line = _one_line_error(*run_cli("push", out, "--repo", "alice-org/Tiny-GGUF"), reader)
    assert "read-only" in line

    # invalid token
    monkeypatch.setenv("HF_TOKEN", "hf_" + "z" * 34)
    line = _one_line_error(*run_cli("push", out, "--repo", "alice-org/Tiny-GGUF"), "hf_" + "z" * 34)
    assert "invalid" in line

    # no token at all
    monkeypatch.delenv("HF_TOKEN")
    line = _one_line_error(*run_cli("push", out, "--repo", "alice-org/Tiny-GGUF"), token)
    assert "no Hugging Face token" in line and "hf auth login" in line
    assert "alice-org/Tiny-GGUF" not in hub_server.state.repos

    # an artifact altered after quantkit recorded it (same size, other bytes) is not published
    data = bytearray((out / "TinyLlama-Chat-Q4_K_M.gguf").read_bytes())
    data[-1] ^= 0xFF
    (out / "TinyLlama-Chat-Q4_K_M.gguf").write_bytes(bytes(data))
    monkeypatch.setenv("HF_TOKEN", token)
    line = _one_line_error(*run_cli("push", out, "--repo", "alice-org/Tiny-GGUF"), token)
    assert "changed since quantkit made it" in line and "TinyLlama-Chat-Q4_K_M.gguf" in line
    assert "alice-org/Tiny-GGUF" not in hub_server.state.repos

    # bad repo id
    monkeypatch.setenv("HF_TOKEN", token)
    line = _one_line_error(*run_cli("push", out, "--repo", "not a repo"), token)
    assert "namespace/name" in line


def test_licence_rules_on_push(hub_server, tmp_path, run_cli):
    token = hub_server.token
    # Llama licence, name without "Llama": warns, still pushes; the licence files travel with the quants
    out = make_gguf_set(tmp_path / "llama", license="llama3.1", base_id="meta-llama/Llama-3.1-8B-Instruct",
                        model_name="Llama-3.1-8B-Instruct")
    code, stdout, err = run_cli("push", out, "--repo", "alice-org/Tiny-8B-GGUF")
    assert code == 0, err
    assert 'begin with "Llama"' in err and "warning:" in err
    files = hub_server.files("alice-org/Tiny-8B-GGUF")
    assert "LICENSE" in files and "USE_POLICY.md" in files and b"Built with Llama" in files["README.md"]

    # CC-BY-NC: --public refused unless --accept-license-terms; private works with a loud warning
    nc = make_gguf_set(tmp_path / "nc", license="cc-by-nc-4.0")
    line = _one_line_error(*run_cli("push", nc, "--repo", "alice-org/NC-GGUF", "--public"), token)
    assert "non-commercial" in line and "--accept-license-terms" in line
    assert "alice-org/NC-GGUF" not in hub_server.state.repos
    code, _, err = run_cli("push", nc, "--repo", "alice-org/NC-GGUF")
    assert code == 0 and "LICENCE WARNING" in err
    # the private repo cannot be flipped public without accepting either
    line = _one_line_error(*run_cli("push", nc, "--repo", "alice-org/NC-GGUF", "--public"), token)
    assert "non-commercial" in line and hub_server.repo("alice-org/NC-GGUF").private
    code, _, err = run_cli("push", nc, "--repo", "alice-org/NC-GGUF", "--public", "--accept-license-terms")
    assert code == 0, err
    assert not hub_server.repo("alice-org/NC-GGUF").private

    # unknown licence: refused unless --license
    unk = make_gguf_set(tmp_path / "unk", license=None)
    line = _one_line_error(*run_cli("push", unk, "--repo", "alice-org/Unk-GGUF"), token)
    assert "unknown" in line and "--license" in line
    code, _, err = run_cli("push", unk, "--repo", "alice-org/Unk-GGUF", "--license", "mit")
    assert code == 0, err
    assert b"license: mit" in hub_server.files("alice-org/Unk-GGUF")["README.md"]


def test_dry_run_branch_and_pull_request(hub_server, tmp_path, run_cli):
    repo = "alice-org/Tiny-GGUF"
    out = make_gguf_set(tmp_path / "gguf")
    before = (out / "quantkit.json").read_bytes()
    code, stdout, err = run_cli("push", out, "--repo", repo, "--dry-run")
    assert code == 0, err
    assert "[dry run]" in stdout and "would create the repo" in stdout and "TinyLlama-Chat-Q4_K_M.gguf" in stdout
    assert repo not in hub_server.state.repos and not (out / "README.md").exists()
    assert (out / "quantkit.json").read_bytes() == before

    assert run_cli("push", out, "--repo", repo)[0] == 0
    main_head = hub_server.head(repo)

    # a branch: created from main, the files land there, main unchanged
    awq = make_awq_folder(tmp_path / "awq")
    code, stdout, err = run_cli("push", awq, "--repo", "alice-org/Tiny-AWQ", "--revision", "w4-g128", "--json")
    assert code == 0, err
    res = json.loads(stdout)
    assert res["revision"] == "w4-g128" and res["url"].endswith("/tree/w4-g128")
    assert "model.safetensors" in hub_server.files("alice-org/Tiny-AWQ", "w4-g128")
    assert "model.safetensors" not in hub_server.files("alice-org/Tiny-AWQ", "main")
    assert b"tree/w4-g128" in hub_server.files("alice-org/Tiny-AWQ", "w4-g128")["README.md"]

    # a pull request: main does not move
    m = json.loads((out / "quantkit.json").read_text())
    m["artifacts"]["TinyLlama-Chat-Q4_K_M.gguf"]["params"]["note"] = "changed"
    (out / "quantkit.json").write_text(json.dumps(m))
    code, stdout, err = run_cli("push", out, "--repo", repo, "--create-pr", "--json")
    assert code == 0, err
    res = json.loads(stdout)
    assert res["pr_url"] and "/discussions/1" in res["pr_url"]
    assert hub_server.head(repo) == main_head
    assert hub_server.head(repo, "refs/pr/1") == res["commit"]


def test_cut_connection_during_upload_is_retried(hub_server, tmp_path, run_cli):
    out = make_gguf_set(tmp_path / "gguf")
    hub_server.fail_next("lfs_put", drop=True)
    code, stdout, err = run_cli("push", out, "--repo", "alice-org/Tiny-GGUF", "--json")
    assert code == 0, err
    assert hub_server.counts["fault:lfs_put"] == 1 and hub_server.counts["lfs_put"] == 2
    files = hub_server.files("alice-org/Tiny-GGUF")
    for name in ("TinyLlama-Chat-Q8_0.gguf", "TinyLlama-Chat-Q4_K_M.gguf"):
        assert files[name] == (out / name).read_bytes()


def test_token_from_hf_auth_login_file(hub_server, tmp_path, run_cli, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    (hub_server.hf_home / "token").write_text(hub_server.token)  # where `hf auth login` stores it
    out = make_awq_folder(tmp_path / "awq")
    code, stdout, err = run_cli("push", out, "--repo", "alice/Tiny-AWQ")
    assert code == 0, err
    assert hub_server.token not in stdout + err
    assert "model.safetensors" in hub_server.files("alice/Tiny-AWQ")


# -- the diff (no network) ---------------------------------------------------------------------------------------------

def _git_blob_id(data: bytes) -> str:
    """git's own answer (the Hub lists small files by it)."""
    import subprocess

    return subprocess.run(["git", "hash-object", "--stdin"], input=data, capture_output=True,
                          check=True).stdout.decode().strip()


def test_diff_files_actions_without_network(tmp_path):
    from quantkit.publish import LocalFile, RemoteFile, diff_files

    big = tmp_path / "model.gguf"
    big.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    big_sha = _sha(big)
    other_big = tmp_path / "other.gguf"
    other_big.write_bytes(b"GGUF" + bytes(range(255, -1, -1)) * 64)  # same size, other bytes
    grown = tmp_path / "grown.gguf"
    grown.write_bytes(b"GGUF" + bytes(range(256)) * 65)
    card = b"---\nlicense: mit\n---\n# card\n"
    new = tmp_path / "new.txt"
    new.write_text("hello")

    local = {
        "README.md": LocalFile("README.md", card),  # generated, identical to remote
        "quantkit.json": LocalFile("quantkit.json", b'{"a": 2}\n'),  # generated, same size, other content
        "model.gguf": LocalFile("model.gguf", big, big_sha),  # LFS, identical
        "other.gguf": LocalFile("other.gguf", other_big),  # LFS, same size, changed
        "grown.gguf": LocalFile("grown.gguf", grown),  # LFS, other size: no hashing needed
        "new.txt": LocalFile("new.txt", new),
    }
    remote = {
        "README.md": RemoteFile("README.md", len(card), _git_blob_id(card)),
        "quantkit.json": RemoteFile("quantkit.json", 9, _git_blob_id(b'{"a": 1}\n')),
        "model.gguf": RemoteFile("model.gguf", big.stat().st_size, "x", big_sha),
        "other.gguf": RemoteFile("other.gguf", other_big.stat().st_size, "x", big_sha),
        "grown.gguf": RemoteFile("grown.gguf", big.stat().st_size, "x", big_sha),
        "old.gguf": RemoteFile("old.gguf", 10, "x", "ab" * 32),
        ".gitattributes": RemoteFile(".gitattributes", 5, "y"),
    }
    got = {f.path: (f.action, f.reason) for f in diff_files(local, remote)}
    assert got == {
        "README.md": ("unchanged", "generated"),
        "quantkit.json": ("upload", "generated (changed)"),
        "model.gguf": ("unchanged", ""),
        "other.gguf": ("upload", "changed"),
        "grown.gguf": ("upload", "changed"),
        "new.txt": ("upload", "new"),
        "old.gguf": ("keep", "not produced any more; --prune deletes it"),
    }
    assert local["grown.gguf"]._sha256 is None  # a size change is enough: not hashed in the plan
    pruned = {f.path: f.action for f in diff_files(local, remote, prune=True)}
    assert pruned["old.gguf"] == "delete" and ".gitattributes" not in pruned
    sizes = {f.path: f.size for f in diff_files(local, remote)}
    assert sizes["grown.gguf"] == grown.stat().st_size and sizes["old.gguf"] == 10


def test_local_file_against_remote_lfs_is_hashed_and_checked(tmp_path):
    """Same size as the remote LFS file: the local bytes are hashed, never taken from quantkit.json's record."""
    from quantkit.errors import QuantkitError
    from quantkit.publish import LocalFile, RemoteFile, diff_files

    p = tmp_path / "m.gguf"
    p.write_bytes(b"GGUF" + bytes(1000))
    recorded = _sha(p)
    remote = {"m.gguf": RemoteFile("m.gguf", p.stat().st_size, "x", recorded)}
    p.write_bytes(b"GGUF" + bytes(999) + b"\x01")  # modified after the manifest was written, same size
    with pytest.raises(QuantkitError, match="m.gguf changed since quantkit made it"):
        diff_files({"m.gguf": LocalFile("m.gguf", p, recorded)}, remote)


def test_modified_artifact_is_refused_when_the_remote_has_the_original(hub_server, tmp_path, run_cli):
    repo = "alice-org/Tiny-GGUF"
    out = make_gguf_set(tmp_path / "gguf")
    assert run_cli("push", out, "--repo", repo)[0] == 0
    head = hub_server.head(repo)
    before = json.loads((out / "quantkit.json").read_text())["pushes"]

    data = bytearray((out / "TinyLlama-Chat-Q4_K_M.gguf").read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes: quantkit.json's sha256 and the remote LFS oid are both stale
    (out / "TinyLlama-Chat-Q4_K_M.gguf").write_bytes(bytes(data))
    for extra in ((), ("--dry-run",)):
        line = _one_line_error(*run_cli("push", out, "--repo", repo, *extra), hub_server.token)
        assert "changed since quantkit made it" in line and "TinyLlama-Chat-Q4_K_M.gguf" in line
    assert hub_server.head(repo) == head
    assert json.loads((out / "quantkit.json").read_text())["pushes"] == before  # no push recorded


def test_plan_then_apply_is_the_push_and_the_dry_run_shows_the_plan(hub_server, tmp_path, run_cli):
    from quantkit.publish import PushResult, apply_push, describe, plan_push

    repo = "alice-org/Tiny-GGUF"
    out = make_gguf_set(tmp_path / "gguf")
    plan = plan_push(out, repo)
    assert repo not in hub_server.state.repos and not (out / "README.md").exists()  # planning changed nothing
    assert plan.token == hub_server.token and hub_server.token not in repr(plan)
    planned = [(f.path, f.action) for f in plan.files]
    assert planned == [("README.md", "upload"), ("quantkit.json", "upload"),
                       ("TinyLlama-Chat-Q4_K_M.gguf", "upload"), ("TinyLlama-Chat-Q8_0.gguf", "upload")]

    code, stdout, err = run_cli("push", out, "--repo", repo, "--dry-run")
    assert code == 0, err
    assert stdout.strip() == describe(plan.result(dry_run=True)).strip()

    res = apply_push(plan)
    assert [(f.path, f.action) for f in res.files] == planned and res.commit == hub_server.head(repo)
    for f in res.files:
        if f.path.endswith(".gguf"):
            assert f.sha256 == _sha(out / f.path)
    assert PushResult.from_json(res.to_json()) == res
    assert json.loads((out / "quantkit.json").read_text())["pushes"][-1]["commit"] == res.commit

    again = plan_push(out, repo)
    assert {f.action for f in again.files} == {"unchanged"} and again.head == res.commit
