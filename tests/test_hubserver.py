"""The local test Hub (tests/hubserver.py) speaks what the real huggingface_hub client expects."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest


def _src(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "README.md").write_text("---\nlicense: apache-2.0\ntags: [gguf]\npipeline_tag: text-generation\n---\n# hi\n")
    (src / "config.json").write_text('{"a": 1}')
    (src / "w.safetensors").write_bytes(os.urandom(300_000))
    (src / "sub" / "x.gguf").write_bytes(os.urandom(50_000))
    return src


def test_upload_folder_download_back_and_metadata(hub_server, tmp_path):
    from huggingface_hub import HfApi, snapshot_download

    api = HfApi()
    assert api.whoami()["name"] == "alice"
    assert [o["name"] for o in api.whoami()["orgs"]] == ["alice-org"]
    api.create_repo("alice-org/m1", private=True)
    api.create_repo("alice-org/m1", private=True, exist_ok=True)  # 409 -> fine
    src = _src(tmp_path)
    ci = api.upload_folder(folder_path=src, repo_id="alice-org/m1")
    assert hub_server.counts["commit"] == 1 and hub_server.counts["lfs_put"] == 2  # .safetensors + .gguf via LFS

    info = api.model_info("alice-org/m1", files_metadata=True)
    assert info.sha == ci.oid and info.private and info.card_data.license == "apache-2.0"
    assert info.pipeline_tag == "text-generation" and "gguf" in info.tags
    sib = {s.rfilename: s for s in info.siblings}
    assert set(sib) == {".gitattributes", "README.md", "config.json", "w.safetensors", "sub/x.gguf"}
    assert sib["w.safetensors"].lfs.sha256 == hashlib.sha256((src / "w.safetensors").read_bytes()).hexdigest()
    assert sib["config.json"].lfs is None and sib["config.json"].size == 8
    assert sorted(api.list_repo_files("alice-org/m1")) == sorted(sib)
    top = {f.path for f in api.list_repo_tree("alice-org/m1")}
    assert top == {".gitattributes", "README.md", "config.json", "w.safetensors", "sub"}

    snap = Path(snapshot_download("alice-org/m1"))
    for p in src.rglob("*"):
        if p.is_file():
            assert (snap / p.relative_to(src)).read_bytes() == p.read_bytes(), p

    # unchanged content: nothing uploaded, no new commit
    puts = hub_server.counts["lfs_put"]
    assert api.upload_folder(folder_path=src, repo_id="alice-org/m1").oid == ci.oid
    assert hub_server.counts["lfs_put"] == puts and hub_server.counts["commit"] == 1

    pi = {p.path: p for p in api.get_paths_info("alice-org/m1", ["w.safetensors", "config.json", "nope"])}
    assert set(pi) == {"w.safetensors", "config.json"} and pi["w.safetensors"].lfs is not None


def test_resolve_headers_like_the_hub(hub_server, tmp_path):
    import httpx

    sha = hub_server.seed("acme/m", _src(tmp_path))
    base = f"{hub_server.endpoint}/acme/m/resolve/main"
    r = httpx.head(f"{base}/config.json")
    assert r.status_code == 200 and r.headers["X-Repo-Commit"] == sha
    assert r.headers["ETag"].strip('"') == hashlib.sha1(b'blob 8\0{"a": 1}').hexdigest()
    assert r.headers["Content-Length"] == "8"
    r = httpx.head(f"{base}/w.safetensors")
    assert r.status_code == 302 and r.headers["X-Repo-Commit"] == sha
    assert r.headers["X-Linked-Size"] == "300000" and r.headers["Location"].startswith("http://localhost:")
    blob = httpx.get(r.headers["Location"])  # the "CDN" needs no Authorization
    assert hashlib.sha256(blob.content).hexdigest() == r.headers["X-Linked-Etag"].strip('"')
    assert httpx.head(f"{hub_server.endpoint}/acme/m/resolve/{sha}/config.json").status_code == 200
    r = httpx.head(f"{base}/missing.txt")
    assert r.status_code == 404 and r.headers["X-Error-Code"] == "EntryNotFound"
    r = httpx.head(f"{hub_server.endpoint}/acme/m/resolve/nope/config.json")
    assert r.headers["X-Error-Code"] == "RevisionNotFound"


def test_auth_private_gated_and_org_membership(hub_server, tmp_path):
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    src = _src(tmp_path)
    hub_server.seed("alice-org/private", src, private=True)
    hub_server.seed("meta/gated", src, gated="manual")
    bob = hub_server.add_user("bob")
    assert HfApi().model_info("alice-org/private").private  # a member reads it
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=False).model_info("alice-org/private")
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=bob).model_info("alice-org/private")

    assert HfApi(token=bob).model_info("meta/gated").gated == "manual"  # metadata is public
    with pytest.raises(GatedRepoError):
        hf_hub_download("meta/gated", "config.json", token=bob, cache_dir=tmp_path / "c1")
    hub_server.grant("meta/gated", "bob")
    assert Path(hf_hub_download("meta/gated", "config.json", token=bob, cache_dir=tmp_path / "c2")).read_text()

    with pytest.raises(HfHubHTTPError) as e:
        HfApi(token=bob).create_repo("alice-org/x")
    assert e.value.response.status_code == 403
    reader = hub_server.add_user("reader", orgs=["alice-org"], role="read")
    with pytest.raises(HfHubHTTPError):
        HfApi(token=reader).create_repo("alice-org/y")
    with pytest.raises(HfHubHTTPError) as e:
        HfApi(token="hf_unknown_token_000000000000000000").model_info("meta/gated")
    assert e.value.response.status_code == 401


def test_branches_prs_deletes_and_faults(hub_server, tmp_path):
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    api = HfApi()
    src = _src(tmp_path)
    api.create_repo("alice/m")
    api.upload_folder(folder_path=src, repo_id="alice/m")
    api.create_branch("alice/m", branch="dev")
    assert api.model_info("alice/m", revision="dev").sha == api.model_info("alice/m").sha
    api.create_commit("alice/m", [CommitOperationAdd("extra.txt", b"dev only")], commit_message="x", revision="dev")
    assert "extra.txt" in api.list_repo_files("alice/m", revision="dev")
    assert "extra.txt" not in api.list_repo_files("alice/m")

    api.create_commit("alice/m", [CommitOperationDelete("sub/x.gguf")], commit_message="rm")
    assert "sub/x.gguf" not in api.list_repo_files("alice/m")
    pr = api.create_commit("alice/m", [CommitOperationAdd("pr.txt", b"pr")], commit_message="pr", create_pr=True)
    assert pr.pr_url.endswith("/discussions/1") and "pr.txt" not in api.list_repo_files("alice/m")
    assert "pr.txt" in api.list_repo_files("alice/m", revision="refs/pr/1")

    # a commit failing mid-way or an aborted LFS upload leave the branch where it was
    before = hub_server.head("alice/m")
    (src / "config.json").write_text('{"a": 2}')
    (src / "w.safetensors").write_bytes(os.urandom(300_000))
    hub_server.fail_next("commit")
    with pytest.raises(Exception):  # noqa: B017  whichever error: what matters is the branch did not move
        api.upload_folder(folder_path=src, repo_id="alice/m")
    assert hub_server.head("alice/m") == before
    (src / "w.safetensors").write_bytes(os.urandom(300_000))
    hub_server.fail_next("lfs_put")
    with pytest.raises(Exception):  # noqa: B017  whichever error: what matters is the branch did not move
        api.upload_folder(folder_path=src, repo_id="alice/m")
    assert hub_server.head("alice/m") == before
    api.upload_folder(folder_path=src, repo_id="alice/m")
    assert hub_server.files("alice/m")["config.json"] == b'{"a": 2}'
    assert api.list_repo_commits("alice/m")[0].commit_id == hub_server.head("alice/m")
