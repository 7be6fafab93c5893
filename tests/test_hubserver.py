"""The local test Hub (tests/hubserver.py) speaks what the real huggingface_hub client expects."""
import hashlib, os
from pathlib import Path

def test_real_client_against_test_hub(hub_server, tmp_path):
    from huggingface_hub import HfApi, snapshot_download, hf_hub_download
    api = HfApi()
    assert api.whoami()["name"] == "alice"
    url = api.create_repo("alice-org/m1", private=True)

    api.create_repo("alice-org/m1", private=True, exist_ok=True)
    src = tmp_path / "src"; src.mkdir()
    (src / "README.md").write_text("---\nlicense: apache-2.0\ntags: [gguf]\n---\n# hi\n")
    (src / "config.json").write_text('{"a": 1}')
    (src / "w.safetensors").write_bytes(os.urandom(300_000))
    (src / "sub").mkdir(); (src / "sub" / "x.gguf").write_bytes(os.urandom(50_000))
    ci = api.upload_folder(folder_path=src, repo_id="alice-org/m1")

    info = api.model_info("alice-org/m1", files_metadata=True)
    assert info.sha == ci.oid and info.card_data.license == "apache-2.0"

    d = snapshot_download("alice-org/m1")
    for p in src.rglob("*"):
        if p.is_file():
            assert (Path(d) / p.relative_to(src)).read_bytes() == p.read_bytes(), p
    # unchanged -> no upload
    n = hub_server.counts["lfs_put"]
    ci2 = api.upload_folder(folder_path=src, repo_id="alice-org/m1")
    assert hub_server.counts["lfs_put"] == n and ci2.oid == ci.oid
    pi = api.get_paths_info("alice-org/m1", ["w.safetensors", "config.json", "nope"])

    # delete
    from huggingface_hub import CommitOperationDelete
    api.create_commit("alice-org/m1", [CommitOperationDelete("sub/x.gguf")], commit_message="rm")
    assert "sub/x.gguf" not in api.list_repo_files("alice-org/m1")
    # private invisible without token
    from huggingface_hub.errors import RepositoryNotFoundError, GatedRepoError
    import pytest
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=False).model_info("alice-org/m1")
    bob = hub_server.add_user("bob")
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=bob).model_info("alice-org/m1")
    # gated
    hub_server.seed("meta/g", src, gated="manual")
    with pytest.raises(GatedRepoError):
        hf_hub_download("meta/g", "config.json", token=bob)
    hub_server.grant("meta/g", "bob")
    hf_hub_download("meta/g", "config.json", token=bob)
    # revision
    api.create_branch("alice-org/m1", branch="dev")
    assert api.model_info("alice-org/m1", revision="dev").sha == api.model_info("alice-org/m1").sha
    # fault: commit
    (src / "config.json").write_text('{"a": 2}')
    (src / "w.safetensors").write_bytes(os.urandom(300_000))
    before = hub_server.head("alice-org/m1")
    hub_server.fail_next("commit")
    with pytest.raises(Exception):
        api.upload_folder(folder_path=src, repo_id="alice-org/m1")
    assert hub_server.head("alice-org/m1") == before
    (src / "w.safetensors").write_bytes(os.urandom(300_000))
    hub_server.fail_next("lfs_put")
    with pytest.raises(Exception):
        api.upload_folder(folder_path=src, repo_id="alice-org/m1")
    assert hub_server.head("alice-org/m1") == before
    api.upload_folder(folder_path=src, repo_id="alice-org/m1")
    assert hub_server.files("alice-org/m1")["config.json"] == b'{"a": 2}'
    # org write needs membership
    from huggingface_hub.errors import HfHubHTTPError
    with pytest.raises(HfHubHTTPError):
        HfApi(token=bob).create_repo("alice-org/x")
    ci = api.upload_folder(folder_path=src, repo_id="alice-org/m1", create_pr=True)

