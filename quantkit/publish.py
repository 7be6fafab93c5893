"""``quantkit push``: publish an output folder to a Hub repo in ONE commit, idempotently.

Order of work: read the manifest and apply the licence rules (:mod:`quantkit.card`); find the token (never
printed or written); check with ``whoami`` that it may write to the namespace; look at the remote repo (does it
exist, is it private, what files does it hold at the target branch, is it ours); compare every local file with the
remote one (LFS sha256 or git blob id) so unchanged files are neither hashed by the client nor uploaded; then
``create_repo(exist_ok=True, private=...)`` and one ``create_commit`` with the card, a cleaned copy of
``quantkit.json`` (no push records, no local paths), the artifacts and (for licences that require it) the base's
licence files. A commit is all-or-nothing on the Hub, so a failed upload leaves the repo as it was and the same
command resumes (LFS objects already uploaded are not sent again). Remote files no longer produced are deleted only
with ``prune``. The push (repo, branch, commit, url, visibility) is recorded in ``quantkit.json``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from quantkit.errors import QuantkitError
from quantkit.manifest import MANIFEST_NAME, Manifest
from quantkit.util import PARTIAL_SUFFIX, human_size, now_iso, sha256_file

SKIP_DIRS = {".quantkit-work", ".git", "__pycache__", ".cache", ".ipynb_checkpoints"}
LICENSE_FILES = ("LICENSE", "LICENSE*", "LICENCE*", "USE_POLICY.md", "NOTICE*")
IGNORED_REMOTE = {".gitattributes"}


@dataclass
class FileAction:
    path: str  # path in the repo
    action: str  # upload | unchanged | delete | keep
    size: int | None = None
    reason: str = ""
    sha256: str | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in (None, "")}


@dataclass
class PushResult:
    repo: str
    revision: str
    private: bool
    dry_run: bool
    created: bool  # the repo was (or would be) created
    files: list[FileAction]
    warnings: list[str] = field(default_factory=list)
    commit: str | None = None
    url: str | None = None
    pr_url: str | None = None
    license: str | None = None

    @property
    def uploads(self) -> list[FileAction]:
        return [f for f in self.files if f.action == "upload"]

    @property
    def deletes(self) -> list[FileAction]:
        return [f for f in self.files if f.action == "delete"]

    def to_json(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "files"}
        d["files"] = [f.to_json() for f in self.files]
        d["uploaded"] = len(self.uploads)
        d["uploaded_bytes"] = sum(f.size or 0 for f in self.uploads)
        d["deleted"] = len(self.deletes)
        d["unchanged"] = sum(f.action == "unchanged" for f in self.files)
        return d


# -- local side ---------------------------------------------------------------------------------------------------------

def local_files(folder: Path, manifest: Manifest) -> dict[str, Path]:
    """Files of the output folder that belong in the repo (path in repo -> local path).

    Skipped: hidden files and folders (``.quantkit-work/`` and friends), unfinished ``*.partial`` files, the
    intermediates recorded in the manifest (the F16/F32 GGUF, the imatrix) and README.md / quantkit.json, which
    are generated for the push.
    """
    inter_paths = set()
    for rec in (manifest.data.get("intermediates") or {}).values():
        if isinstance(rec, dict) and rec.get("path"):
            p = Path(rec["path"])
            try:
                inter_paths.add((p if p.is_absolute() else folder / p).resolve().relative_to(folder.resolve())
                                .as_posix())
            except ValueError:
                pass
    out: dict[str, Path] = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS)
        for name in sorted(files):
            if name.startswith(".") or name.endswith(PARTIAL_SUFFIX):
                continue
            p = Path(root) / name
            rel = p.relative_to(folder).as_posix()
            if rel in (MANIFEST_NAME, "README.md") or rel in inter_paths:
                continue
            if p.is_file():
                out[rel] = p
    return out


def public_manifest(manifest: Manifest) -> bytes:
    """The quantkit.json that goes to the Hub: no push records, no local paths, no card/push history.

    Deterministic, so that re-pushing an unchanged folder leaves it unchanged too.
    """
    from quantkit.card import scrub_paths

    data = scrub_paths(json.loads(json.dumps(manifest.data, default=str)))
    data.pop("pushes", None)
    data.get("base", {}).pop("local_path", None)
    ev = data.get("evaluation") or {}
    if isinstance(ev.get("base"), dict):
        ev["base"].pop("path", None)
    for rec in (data.get("intermediates") or {}).values():
        if isinstance(rec, dict):
            for k in list(rec):
                if k in ("local_path", "work_dir") or (k == "path" and os.path.isabs(str(rec[k]))):
                    rec[k] = os.path.basename(str(rec[k]))
    data["history"] = [h for h in data.get("history", []) if h.get("stage") not in ("card", "push")]
    return (json.dumps(data, indent=2, sort_keys=False) + "\n").encode()


def _git_blob_oid(path: Path | None = None, data: bytes | None = None) -> str:
    h = hashlib.sha1()
    if data is not None:
        h.update(b"blob %d\0" % len(data))
        h.update(data)
        return h.hexdigest()
    h.update(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _same(remote, local: Path | bytes, recorded_sha256: str | None) -> tuple[bool, str | None]:
    """Is the local content the remote file? Returns (same, sha256 if computed)."""
    size = len(local) if isinstance(local, bytes) else local.stat().st_size
    if remote is None or remote.size != size:
        return False, None
    if remote.lfs is not None:
        sha = recorded_sha256 or (hashlib.sha256(local).hexdigest() if isinstance(local, bytes) else
                                  sha256_file(local))
        return sha == remote.lfs.sha256, sha
    oid = _git_blob_oid(data=local) if isinstance(local, bytes) else _git_blob_oid(local)
    return oid == remote.blob_id, None


# -- errors -------------------------------------------------------------------------------------------------------------

def _push_error(e: Exception, repo_id: str, what: str) -> QuantkitError:
    from huggingface_hub import errors as hf_errors

    resp = getattr(e, "response", None)
    status = getattr(resp, "status_code", None)
    headers = getattr(resp, "headers", None) or {}
    server_msg = headers.get("X-Error-Message") or ""
    if status == 401 and "invalid credentials" in server_msg.lower():
        return QuantkitError("the Hub rejected your token as invalid or expired: set HF_TOKEN to a valid write "
                             "token or run `hf auth login` again")
    if isinstance(e, hf_errors.RepositoryNotFoundError) or status in (401, 403):
        return QuantkitError(f"no write access to {repo_id}: your token cannot {what} there (use a write token of "
                             f"a member of {repo_id.split('/')[0]!r}, or push to your own namespace)")
    if isinstance(e, hf_errors.RevisionNotFoundError):
        return QuantkitError(f"{repo_id} has no branch for this push ({server_msg or e}); check --revision")
    names = {type(x).__name__ for x in (e, e.__cause__, e.__context__) if x is not None}
    if names & {"ConnectError", "ConnectTimeout", "ReadTimeout", "TimeoutException", "NetworkError",
                "RemoteProtocolError", "ConnectionError", "OfflineModeIsEnabled"}:
        return QuantkitError(f"cannot reach the Hub to {what} {repo_id}: check your network or HF_ENDPOINT, then "
                             "re-run (nothing was changed on the Hub)")
    detail = server_msg or (str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    if e.__cause__ is not None and not server_msg:
        cause = getattr(getattr(e.__cause__, "response", None), "headers", {}) or {}
        detail = f"{detail} ({cause.get('X-Error-Message') or str(e.__cause__).strip().splitlines()[0]})"
    code = f"HTTP {status}: " if status else ""
    return QuantkitError(f"could not {what} {repo_id} ({code}{detail}); nothing was changed on the Hub (a commit is "
                         "all-or-nothing): re-run the same command to retry")


# -- the push -----------------------------------------------------------------------------------------------------------

def _check_namespace(api, token: str, repo_id: str) -> str:
    """whoami: the token must be able to write in the repo's namespace. Returns the user name."""
    try:
        me = api.whoami(token=token)
    except Exception as e:
        raise _push_error(e, repo_id, "check your token for") from None
    name = me.get("name") or ""
    ns = repo_id.split("/")[0]
    orgs = [o.get("name") for o in me.get("orgs") or []]
    role = ((me.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise QuantkitError(f"your token (user {name}) is read-only: create a token with write access "
                            "(https://huggingface.co/settings/tokens), then set HF_TOKEN or run `hf auth login`")
    if role != "fineGrained" and ns != name and ns not in orgs:
        raise QuantkitError(f"no write access to {repo_id}: user {name} is not a member of the organisation {ns!r} "
                            f"(your namespaces: {', '.join([name, *orgs])})")
    return name


def _remote_state(api, repo_id: str, revision: str, token) -> tuple[bool, bool | None, str | None, dict, bool]:
    """(exists, private, head sha of the branch or None, {path: RepoFile}, branch exists)."""
    from huggingface_hub import errors as hf_errors
    from huggingface_hub.hf_api import RepoFile

    try:
        info = api.model_info(repo_id, token=token)
    except hf_errors.RepositoryNotFoundError:
        return False, None, None, {}, False
    except Exception as e:
        raise _push_error(e, repo_id, "look at") from None
    branch_exists = True
    try:
        head = api.model_info(repo_id, revision=revision, token=token).sha if revision != "main" else info.sha
    except hf_errors.RevisionNotFoundError:
        branch_exists, head = False, info.sha  # a new branch starts from main
    except Exception as e:
        raise _push_error(e, repo_id, "look at") from None
    try:
        files = {f.path: f for f in api.list_repo_tree(repo_id, recursive=True, revision=head, token=token)
                 if isinstance(f, RepoFile)}
    except Exception as e:
        raise _push_error(e, repo_id, "list the files of") from None
    return True, bool(info.private), head, files, branch_exists


def _check_ownership(api, repo_id: str, head: str, remote: dict, manifest: Manifest, token) -> None:
    """Refuse to push into a repo that holds something else."""
    others = sorted(p for p in remote if p not in IGNORED_REMOTE and p != "README.md")
    if not others:
        return
    if MANIFEST_NAME not in remote:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise QuantkitError(f"{repo_id} already exists with other content ({len(others)} files not published by "
                            f"quantkit: {shown}): choose another --repo, or empty that repo first")
    try:
        from huggingface_hub import hf_hub_download

        remote_manifest = json.loads(Path(hf_hub_download(repo_id, MANIFEST_NAME, revision=head,
                                                          token=token)).read_text())
    except Exception:
        return  # unreadable remote manifest: the file comparison below still protects the content
    theirs = (remote_manifest.get("base") or {}).get("id")
    ours = manifest.base.get("id")
    if theirs and ours and theirs != ours:
        raise QuantkitError(f"{repo_id} already holds quantisations of {theirs}, not of {ours}: choose another "
                            "--repo")


def push(folder: str | os.PathLike, repo_id: str, *, private: bool | None = None, dry_run: bool = False,
         create_pr: bool = False, revision: str | None = None, prune: bool = False, license: str | None = None,
         accept_license_terms: bool = False, token: str | None = None, card: bool = True,
         quantized_by: str | None = None, allow_unverified: bool = False) -> PushResult:
    """``quantkit push OUTDIR --repo org/name``. See the module docstring; returns what was (or would be) done."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, get_token

    from quantkit.card import check_license, license_info, render_card
    from quantkit.hub import HUB_ID_RE
    from quantkit.verify import check_publishable

    folder = Path(folder)
    if not folder.is_dir():
        raise QuantkitError(f"{folder} is not a folder (give a quantkit output folder holding quantkit.json)")
    if not HUB_ID_RE.match(repo_id or ""):
        raise QuantkitError(f"--repo {repo_id!r} is not a Hub repo id: give it as namespace/name (e.g. my-org/"
                            f"Model-GGUF)")
    m = Manifest.load(folder, create=False)
    if not m.artifacts:
        raise QuantkitError(f"{folder}/quantkit.json lists no artifacts: nothing to push")
    revision = revision or "main"
    if create_pr and revision.startswith("refs/pr/"):
        raise QuantkitError("--create-pr opens a new pull request; give the branch it targets with --revision")

    # files first: an artifact that changed after it was made must not be published under its old record
    files = local_files(folder, m)
    recorded: dict[str, str] = {}
    for name, rec in m.artifacts.items():
        base_dir = rec.get("path") or "."
        for f in rec.get("files") or []:
            rel = f["path"]
            if rel in (MANIFEST_NAME, "README.md"):
                continue  # generated for the push
            if rel not in files:
                alt = (Path(base_dir) / rel).as_posix() if base_dir not in (".", "") else rel
                if alt in files:
                    rel = alt
                else:
                    raise QuantkitError(f"artifact {name}: {f['path']} is missing from {folder}; rebuild it "
                                        "(re-run the command that made it) before pushing")
            if files[rel].stat().st_size != f.get("size"):
                raise QuantkitError(f"artifact {name}: {rel} changed since quantkit made it (size differs); "
                                    "rebuild it before pushing")
            recorded[rel] = f.get("sha256")

    lic = license_info(m.base, license)
    check_license(lic, repo_id, public=private is False, accept_terms=accept_license_terms)  # fail before any I/O
    unverified_warnings = check_publishable(m, allow_unverified)

    token = token or get_token()
    api = HfApi(token=token if token else False)
    user = None
    if token:
        user = _check_namespace(api, token, repo_id)
    elif not dry_run:
        raise QuantkitError("no Hugging Face token found: set HF_TOKEN or run `hf auth login` with a token that "
                            "has write access")

    exists, remote_private, head, remote, branch_exists = _remote_state(api, repo_id, revision,
                                                                        token if token else False)
    if exists:
        _check_ownership(api, repo_id, head, remote, m, token if token else False)
    effective_private = private if private is not None else (remote_private if exists else True)

    warnings = check_license(lic, repo_id, public=not effective_private, accept_terms=accept_license_terms)
    warnings += unverified_warnings

    # generated files: the card (for this repo and branch) and the public manifest
    generated: dict[str, bytes] = {MANIFEST_NAME: public_manifest(m)}
    rendered = None
    if card:
        rendered = render_card(folder, repo_id=repo_id, revision=revision, license=license,
                               quantized_by=quantized_by or m.data.get("quantized_by") or user, manifest=m)
        generated["README.md"] = rendered.text.encode()
    elif (folder / "README.md").is_file():
        files["README.md"] = folder / "README.md"
    if lic.family in ("llama", "gemma") and m.base.get("local_path"):
        base_dir = Path(m.base["local_path"])
        if base_dir.is_dir():
            for p in sorted(base_dir.iterdir()):
                if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in LICENSE_FILES) and p.name not in files:
                    files[p.name] = p

    # compare with the remote
    actions: list[FileAction] = []
    adds = []
    for rel, data in sorted(generated.items()):
        same, _ = _same(remote.get(rel), data, None)
        actions.append(FileAction(rel, "unchanged" if same else "upload", len(data),
                                  "generated" + ("" if same else (" (changed)" if rel in remote else " (new)"))))
        if not same:
            adds.append(CommitOperationAdd(path_in_repo=rel, path_or_fileobj=data))
    for rel, p in sorted(files.items()):
        same, sha = _same(remote.get(rel), p, recorded.get(rel))
        size = p.stat().st_size
        if not same and not dry_run:
            # hash once here: it proves the file is the one the manifest recorded, and the client re-uses it
            sha = sha or sha256_file(p)
            if recorded.get(rel) and sha != recorded[rel]:
                raise QuantkitError(f"{rel} changed since quantkit made it (sha256 differs from quantkit.json); "
                                    "rebuild it before pushing")
        actions.append(FileAction(rel, "unchanged" if same else "upload", size,
                                  "" if same else ("changed" if rel in remote else "new"), sha or recorded.get(rel)))
        if not same:
            op = CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(p))
            if sha:
                op.upload_info.sha256 = bytes.fromhex(sha)
            adds.append(op)
    produced = set(generated) | set(files)
    deletes = []
    for rel in sorted(remote):
        if rel in produced or rel in IGNORED_REMOTE:
            continue
        if prune:
            actions.append(FileAction(rel, "delete", remote[rel].size, "no longer produced"))
            deletes.append(CommitOperationDelete(path_in_repo=rel))
        else:
            actions.append(FileAction(rel, "keep", remote[rel].size, "not produced any more; --prune deletes it"))

    if not token:
        warnings.append("no Hugging Face token: the dry run compared with what is publicly visible only")
    result = PushResult(repo=repo_id, revision=revision, private=bool(effective_private), dry_run=dry_run,
                        created=not exists, files=actions, warnings=warnings, license=lic.id)
    endpoint = api.endpoint.rstrip("/")
    result.url = f"{endpoint}/{repo_id}" + (f"/tree/{revision}" if revision != "main" else "")
    if dry_run:
        result.commit = head
        return result

    # -- from here on, the Hub changes ---------------------------------------------------------------------------
    if rendered is not None and ((folder / "README.md").read_text(errors="replace")
                                 if (folder / "README.md").is_file() else None) != rendered.text:
        from quantkit.util import atomic_path

        with atomic_path(folder / "README.md") as tmp:
            tmp.write_text(rendered.text)
    try:
        api.create_repo(repo_id, private=bool(effective_private), exist_ok=True, token=token)
    except Exception as e:
        raise _push_error(e, repo_id, "create") from None
    if exists and private is not None and remote_private != private:
        try:
            api.update_repo_settings(repo_id, private=private, token=token)
        except Exception as e:
            raise _push_error(e, repo_id, "change the visibility of") from None
    if not exists:  # a fresh repo: its initial commit is the parent
        try:
            head = api.model_info(repo_id, token=token).sha
        except Exception as e:
            raise _push_error(e, repo_id, "look at") from None
    if revision != "main" and not branch_exists:
        try:
            api.create_branch(repo_id, branch=revision, exist_ok=True, token=token)
        except Exception as e:
            raise _push_error(e, repo_id, f"create the branch {revision} in") from None

    ops = adds + deletes
    if ops:
        n_up, n_del = len(adds), len(deletes)
        summary = (f"quantkit: {m.base.get('model_name') or 'model'} "
                   + ", ".join(x for x in (f"{n_up} file(s) added/updated" if n_up else "",
                                            f"{n_del} deleted" if n_del else "") if x))
        description = (f"Base: {m.base.get('id') or 'local folder'} @ {m.base.get('sha') or '?'}\n"
                       f"Pushed with quantkit {m.data.get('quantkit_version')}.")
        try:
            info = api.create_commit(repo_id, ops, commit_message=summary, commit_description=description,
                                     revision=revision, create_pr=create_pr, token=token,
                                     parent_commit=None if create_pr else head)
        except Exception as e:
            raise _push_error(e, repo_id, "upload to") from None
        result.commit = info.oid
        result.pr_url = info.pr_url
        if info.pr_url:
            result.url = info.pr_url
    else:
        result.commit = head

    m = Manifest.load(folder, create=False)  # fresh read: keep what another stage wrote meanwhile
    m.data.setdefault("pushes", []).append({
        "repo": repo_id, "revision": revision, "commit": result.commit, "url": result.url,
        "private": result.private, "time": now_iso(), "pr_url": result.pr_url,
        "uploaded": len(result.uploads), "deleted": len(result.deletes),
    })
    m.log("push", repo=repo_id, revision=revision, commit=result.commit, uploaded=len(result.uploads),
          deleted=len(result.deletes))
    m.save()
    return result


def describe(result: PushResult) -> str:
    """Human summary of a push (or of a dry run)."""
    from quantkit.util import format_table

    verb = "would " if result.dry_run else ""
    rows = [[f.action, f.path, human_size(f.size) if f.size is not None else "", f.reason] for f in result.files]
    lines = [format_table(rows, ["action", "file", "size", "note"])]
    up = result.uploads
    vis = "private" if result.private else "public"
    head = (f"{'[dry run] ' if result.dry_run else ''}{result.repo} ({vis}, branch {result.revision})"
            + (f": {verb}create the repo" if result.created else ""))
    lines.insert(0, head)
    lines.append(f"{verb}upload {len(up)} file(s), {human_size(sum(f.size or 0 for f in up))}; "
                 f"{verb}delete {len(result.deletes)}; unchanged "
                 f"{sum(f.action == 'unchanged' for f in result.files)}")
    if not result.dry_run:
        if not up and not result.deletes:
            lines.append(f"up to date: nothing to upload (commit {result.commit})")
        else:
            lines.append(f"commit {result.commit}")
        lines.append(result.url or "")
    return "\n".join(x for x in lines if x is not None)
