"""``quantkit push``: publish an output folder to a Hub repo in ONE commit, idempotently.

Two steps. :func:`plan_push` changes nothing: it reads the manifest and applies the licence rules
(:mod:`quantkit.card`); finds the token (never printed or written); checks with ``whoami`` that it may write to the
namespace; looks at the remote repo (does it exist, is it private, what files does it hold at the target branch, is
it ours); and diffs every local file against the remote one (:func:`diff_files`: LFS sha256 or git blob id; a local
file is hashed when the remote one has the same size, and must match the sha256 quantkit.json recorded) into
upload / unchanged / delete / keep. ``--dry-run`` shows exactly that plan. :func:`apply_push` hashes what it
uploads (checked against quantkit.json too), then ``create_repo(exist_ok=True, private=...)`` and one
``create_commit`` with the card, a cleaned copy of ``quantkit.json`` (no push records, no local paths), the
artifacts and (for licences that require it) the base's licence files, and records the push (repo, branch, commit,
url, visibility) in ``quantkit.json``. A commit is all-or-nothing on the Hub, so a failed upload leaves the repo as it
was and the same command resumes (LFS objects already uploaded are not sent again). Remote files no longer produced
are deleted only with ``prune``. :func:`push` is plan + apply.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from quantkit.errors import QuantkitError, hub_error
from quantkit.manifest import MANIFEST_NAME, Manifest
from quantkit.util import PARTIAL_SUFFIX, human_size, now_iso, sha256_file

log = logging.getLogger(__name__)

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

    @classmethod
    def from_json(cls, d: dict) -> FileAction:
        return cls(**{k: d[k] for k in ("path", "action", "size", "reason", "sha256") if k in d})


class _Actions:
    """What a list of :class:`FileAction` (``self.files``) will upload and delete."""

    files: list[FileAction]

    @property
    def uploads(self) -> list[FileAction]:
        return [f for f in self.files if f.action == "upload"]

    @property
    def deletes(self) -> list[FileAction]:
        return [f for f in self.files if f.action == "delete"]


@dataclass
class PushResult(_Actions):
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

    def to_json(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "files"}
        d["files"] = [f.to_json() for f in self.files]
        d["uploaded"] = len(self.uploads)
        d["uploaded_bytes"] = sum(f.size or 0 for f in self.uploads)
        d["deleted"] = len(self.deletes)
        d["unchanged"] = sum(f.action == "unchanged" for f in self.files)
        return d

    @classmethod
    def from_json(cls, d: dict) -> PushResult:
        names = {f.name for f in fields(cls)} - {"files"}
        return cls(files=[FileAction.from_json(f) for f in d.get("files") or []],
                   **{k: v for k, v in d.items() if k in names})


# -- local side --------------------------------------------------------------------------------------------------------

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


@dataclass
class RemoteFile:
    """What the Hub's tree listing says about one file of the target branch."""

    path: str
    size: int
    blob_id: str | None = None
    lfs_sha256: str | None = None  # set for LFS files

    @classmethod
    def from_repo_file(cls, f) -> RemoteFile:
        """From huggingface_hub's ``RepoFile`` (``list_repo_tree``)."""
        return cls(f.path, f.size, f.blob_id, f.lfs.sha256 if f.lfs is not None else None)


@dataclass
class LocalFile:
    """One file the push puts in the repo: a file of the folder, or generated bytes (the card, the manifest)."""

    path: str  # path in the repo
    source: Path | bytes
    recorded_sha256: str | None = None  # what quantkit.json says the file is
    _sha256: str | None = field(default=None, repr=False)

    @property
    def generated(self) -> bool:
        return isinstance(self.source, bytes)

    @property
    def size(self) -> int:
        return len(self.source) if self.generated else self.source.stat().st_size

    def sha256(self) -> str:
        """sha256 of the content, computed once; a file that no longer matches quantkit.json is refused."""
        if self._sha256 is None:
            sha = hashlib.sha256(self.source).hexdigest() if self.generated else sha256_file(self.source)
            if self.recorded_sha256 and sha != self.recorded_sha256:
                raise QuantkitError(f"{self.path} changed since quantkit made it (sha256 differs from quantkit.json); "
                                    "rebuild it before pushing")
            self._sha256 = sha
        return self._sha256

    def same_as(self, remote: RemoteFile | None) -> bool:
        """Is the remote file this content? LFS files by sha256, small files by git blob id."""
        if remote is None or remote.size != self.size:
            return False
        if remote.lfs_sha256 is not None:
            return self.sha256() == remote.lfs_sha256
        oid = _git_blob_oid(data=self.source) if self.generated else _git_blob_oid(self.source)
        return oid == remote.blob_id


def diff_files(local: dict[str, LocalFile], remote: dict[str, RemoteFile], *, prune: bool = False) -> list[FileAction]:
    """Compare what the push would put in the repo with what the branch holds; no network.

    Each local file is ``upload`` (new or changed) or ``unchanged``; each remote file that is no longer produced is
    ``delete`` with ``prune``, else ``keep``. Local files are hashed only when the remote one has the same size.
    """
    actions = []
    for rel in sorted(local, key=lambda r: (not local[r].generated, r)):
        f = local[rel]
        same = f.same_as(remote.get(rel))
        state = "" if same else ("changed" if rel in remote else "new")
        reason = ("generated" + (f" ({state})" if state else "")) if f.generated else state
        actions.append(FileAction(rel, "unchanged" if same else "upload", f.size, reason,
                                  None if f.generated else (f._sha256 or f.recorded_sha256)))
    for rel in sorted(remote):
        if rel in local or rel in IGNORED_REMOTE:
            continue
        if prune:
            actions.append(FileAction(rel, "delete", remote[rel].size, "no longer produced"))
        else:
            actions.append(FileAction(rel, "keep", remote[rel].size, "not produced any more; --prune deletes it"))
    return actions


# -- the Hub side ------------------------------------------------------------------------------------------------------

def _check_namespace(api, token: str, repo_id: str) -> str:
    """whoami: the token must be able to write in the repo's namespace. Returns the user name."""
    try:
        me = api.whoami(token=token)
    except Exception as e:
        raise hub_error(e, repo_id, what="check your token for", writing=True) from None
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
    """(exists, private, head sha of the branch or None, {path: RemoteFile}, branch exists)."""
    from huggingface_hub import errors as hf_errors
    from huggingface_hub.hf_api import RepoFile

    try:
        info = api.model_info(repo_id, token=token)
    except hf_errors.RepositoryNotFoundError:
        return False, None, None, {}, False
    except Exception as e:
        raise hub_error(e, repo_id, what="look at", writing=True) from None
    branch_exists = True
    try:
        head = api.model_info(repo_id, revision=revision, token=token).sha if revision != "main" else info.sha
    except hf_errors.RevisionNotFoundError:
        branch_exists, head = False, info.sha  # a new branch starts from main
    except Exception as e:
        raise hub_error(e, repo_id, revision, what="look at", writing=True) from None
    try:
        files = {f.path: RemoteFile.from_repo_file(f)
                 for f in api.list_repo_tree(repo_id, recursive=True, revision=head, token=token)
                 if isinstance(f, RepoFile)}
    except Exception as e:
        raise hub_error(e, repo_id, what="list the files of", writing=True) from None
    return True, bool(info.private), head, files, branch_exists


def _check_ownership(repo_id: str, head: str, remote: dict, manifest: Manifest, token) -> None:
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
    except Exception as e:
        log.debug("could not read %s of %s (%s); comparing files only", MANIFEST_NAME, repo_id, e)
        return  # unreadable remote manifest: the file comparison still protects the content
    theirs = (remote_manifest.get("base") or {}).get("id")
    ours = manifest.base.get("id")
    if theirs and ours and theirs != ours:
        raise QuantkitError(f"{repo_id} already holds quantisations of {theirs}, not of {ours}: choose another "
                            "--repo")


# -- plan --------------------------------------------------------------------------------------------------------------

@dataclass
class PushPlan(_Actions):
    """Everything a push will do, decided before the Hub changes: what ``--dry-run`` shows, what apply_push does."""

    folder: Path
    repo: str
    revision: str
    private: bool  # visibility after the push
    exists: bool
    remote_private: bool | None
    head: str | None  # the branch's commit the diff was made against (parent of the new commit)
    branch_exists: bool
    create_pr: bool
    license: str | None
    files: list[FileAction]
    warnings: list[str]
    url: str
    manifest: Manifest = field(repr=False)
    local: dict[str, LocalFile] = field(repr=False, default_factory=dict)
    card_text: str | None = field(repr=False, default=None)
    set_private: bool | None = None  # change an existing repo's visibility to this
    token: str | None = field(repr=False, default=None)

    def result(self, *, dry_run: bool) -> PushResult:
        return PushResult(repo=self.repo, revision=self.revision, private=self.private, dry_run=dry_run,
                          created=not self.exists, files=list(self.files), warnings=list(self.warnings),
                          license=self.license, url=self.url, commit=self.head)


def _local_side(folder: Path, m: Manifest) -> tuple[dict[str, Path], dict[str, str]]:
    """The folder's files for the repo and the sha256 quantkit.json recorded for them; refuses missing or resized
    artifacts (an artifact that changed after it was made must not be published under its old record)."""
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
    return files, recorded


def plan_push(folder: str | os.PathLike, repo_id: str, *, private: bool | None = None, dry_run: bool = False,
              create_pr: bool = False, revision: str | None = None, prune: bool = False, license: str | None = None,
              accept_license_terms: bool = False, token: str | None = None, card: bool = True,
              quantized_by: str | None = None, allow_unverified: bool = False) -> PushPlan:
    """Check the folder, the licence, the token and the remote repo, and diff local against remote files.

    Reads the Hub, changes nothing (locally or remotely). Without a token only a dry run is possible: it compares
    with what is publicly visible.
    """
    from huggingface_hub import HfApi, get_token

    from quantkit.card import render_card
    from quantkit.hub import HUB_ID_RE
    from quantkit.licenses import check_license, license_info
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

    files, recorded = _local_side(folder, m)
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
        _check_ownership(repo_id, head, remote, m, token if token else False)
    effective_private = private if private is not None else (remote_private if exists else True)
    warnings = check_license(lic, repo_id, public=not effective_private, accept_terms=accept_license_terms)
    warnings += unverified_warnings
    if not token:
        warnings.append("no Hugging Face token: the dry run compared with what is publicly visible only")

    # what goes into the commit: the generated card and public manifest, the folder's files, licence files
    local = {MANIFEST_NAME: LocalFile(MANIFEST_NAME, public_manifest(m))}
    card_text = None
    if card:
        card_text = render_card(folder, repo_id=repo_id, revision=revision, license=license,
                                quantized_by=quantized_by or m.data.get("quantized_by") or user, manifest=m).text
        local["README.md"] = LocalFile("README.md", card_text.encode())
    elif (folder / "README.md").is_file():
        files["README.md"] = folder / "README.md"
    if lic.family in ("llama", "gemma") and m.base.get("local_path"):
        base_dir = Path(m.base["local_path"])
        if base_dir.is_dir():
            for p in sorted(base_dir.iterdir()):
                if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in LICENSE_FILES) and p.name not in files:
                    files[p.name] = p
    local.update({rel: LocalFile(rel, p, recorded.get(rel)) for rel, p in files.items()})

    log.debug("%s: %d remote file(s) at %s (%s)", repo_id, len(remote), head or "-",
              "exists" if exists else "new")
    url = api.endpoint.rstrip("/") + f"/{repo_id}" + (f"/tree/{revision}" if revision != "main" else "")
    return PushPlan(folder=folder, repo=repo_id, revision=revision, private=bool(effective_private), exists=exists,
                    remote_private=remote_private, head=head, branch_exists=branch_exists, create_pr=create_pr,
                    license=lic.id, files=diff_files(local, remote, prune=prune), warnings=warnings, url=url,
                    manifest=m, local=local, card_text=card_text, token=token or None,
                    set_private=private if exists and private is not None and remote_private != private else None)


# -- apply -------------------------------------------------------------------------------------------------------------

def apply_push(plan: PushPlan) -> PushResult:
    """Make the planned push: write the card locally, create the repo/branch, ONE commit, record it in
    quantkit.json. Every file to upload is hashed (and checked against quantkit.json) before the Hub changes."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    if not plan.token:
        raise QuantkitError("no Hugging Face token found: set HF_TOKEN or run `hf auth login` with a token that "
                            "has write access")
    repo_id, revision, token, folder, m = plan.repo, plan.revision, plan.token, plan.folder, plan.manifest
    api = HfApi(token=token)
    adds = []
    for fa in plan.uploads:
        f = plan.local[fa.path]
        if f.generated:
            adds.append(CommitOperationAdd(path_in_repo=f.path, path_or_fileobj=f.source))
            continue
        # hash once here: it proves the file is the one the manifest recorded, and the client re-uses it
        fa.sha256 = f.sha256()
        op = CommitOperationAdd(path_in_repo=f.path, path_or_fileobj=str(f.source))
        op.upload_info.sha256 = bytes.fromhex(fa.sha256)
        adds.append(op)
    deletes = [CommitOperationDelete(path_in_repo=fa.path) for fa in plan.deletes]
    result = plan.result(dry_run=False)

    # -- from here on, the Hub changes ---------------------------------------------------------------------------
    readme = folder / "README.md"
    if plan.card_text is not None and (readme.read_text(errors="replace") if readme.is_file() else None) != \
            plan.card_text:
        from quantkit.util import atomic_path

        with atomic_path(readme) as tmp:
            tmp.write_text(plan.card_text)
    head = plan.head
    try:
        api.create_repo(repo_id, private=plan.private, exist_ok=True, token=token)
    except Exception as e:
        raise hub_error(e, repo_id, what="create", writing=True) from None
    if plan.set_private is not None:
        try:
            api.update_repo_settings(repo_id, private=plan.set_private, token=token)
        except Exception as e:
            raise hub_error(e, repo_id, what="change the visibility of", writing=True) from None
    if not plan.exists:  # a fresh repo: its initial commit is the parent
        try:
            head = api.model_info(repo_id, token=token).sha
        except Exception as e:
            raise hub_error(e, repo_id, what="look at", writing=True) from None
    if revision != "main" and not plan.branch_exists:
        try:
            api.create_branch(repo_id, branch=revision, exist_ok=True, token=token)
        except Exception as e:
            raise hub_error(e, repo_id, revision, what=f"create the branch {revision} in", writing=True) from None

    ops = adds + deletes
    if ops:
        n_up, n_del = len(adds), len(deletes)
        summary = (f"quantkit: {m.base.get('model_name') or 'model'} "
                   + ", ".join(x for x in (f"{n_up} file(s) added/updated" if n_up else "",
                                            f"{n_del} deleted" if n_del else "") if x))
        description = (f"Base: {m.base.get('id') or 'local folder'} @ {m.base.get('sha') or '?'}\n"
                       f"Pushed with quantkit {m.data.get('quantkit_version')}.")
        log.debug("uploading %d file(s), %s, to %s in one commit", n_up,
                 human_size(sum(f.size or 0 for f in plan.uploads)), repo_id)
        try:
            info = api.create_commit(repo_id, ops, commit_message=summary, commit_description=description,
                                     revision=revision, create_pr=plan.create_pr, token=token,
                                     parent_commit=None if plan.create_pr else head)
        except Exception as e:
            raise hub_error(e, repo_id, revision, what="upload to", writing=True) from None
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


def push(folder: str | os.PathLike, repo_id: str, *, private: bool | None = None, dry_run: bool = False,
         create_pr: bool = False, revision: str | None = None, prune: bool = False, license: str | None = None,
         accept_license_terms: bool = False, token: str | None = None, card: bool = True,
         quantized_by: str | None = None, allow_unverified: bool = False) -> PushResult:
    """``quantkit push OUTDIR --repo org/name``: :func:`plan_push`, then (unless ``dry_run``) :func:`apply_push`."""
    plan = plan_push(folder, repo_id, private=private, dry_run=dry_run, create_pr=create_pr, revision=revision,
                     prune=prune, license=license, accept_license_terms=accept_license_terms, token=token,
                     card=card, quantized_by=quantized_by, allow_unverified=allow_unverified)
    return plan.result(dry_run=True) if dry_run else apply_push(plan)


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
