"""A small local Hugging Face Hub for tests: real HTTP on 127.0.0.1, spoken to by the real huggingface_hub client.

It implements what ``huggingface_hub`` 1.x calls for the pull / push flows (read from its source):

* ``GET  /api/whoami-v2``                                  tokens map to users (+ their orgs, read/write role)
* ``POST /api/validate-yaml``                              card metadata check done before every README commit
* ``POST /api/repos/create`` / ``/api/repos/delete``       user or org namespace, private, 409 when it exists
* ``PUT  /api/models/{repo}/settings``                     private / gated
* ``GET  /api/models/{repo}[/revision/{rev}]``             model_info: sha, siblings (+ blobs), cardData, gated ...
* ``GET  /api/models/{repo}/tree/{rev}[/{path}]``          list_repo_tree / list_repo_files (recursive or not)
* ``POST /api/models/{repo}/paths-info/{rev}``             get_paths_info (form-encoded ``paths``)
* ``GET  /api/models/{repo}/refs``, ``POST|DELETE .../branch/{name}``, ``GET .../commits/{rev}``
* ``POST /api/models/{repo}/preupload/{rev}``              upload mode (lfs / regular) + remote oid per path
* ``POST /{repo}.git/info/lfs/objects/batch``              LFS batch API, "basic" transfer: upload + verify actions
* ``PUT  /lfs-upload/...`` and ``POST /lfs-verify/...``    where those actions point
* ``POST /api/models/{repo}/commit/{rev}``                 NDJSON commit: file / lfsFile / deletedFile / deletedFolder,
                                                           ``create_pr=1`` opens ``refs/pr/N``; ``parentCommit`` checked
* ``HEAD|GET /{repo}/resolve/{rev}/{path}``                ETag, X-Repo-Commit, Content-Length; LFS files answer 302
                                                           with X-Linked-Etag / X-Linked-Size and a Location on another
                                                           host name (``localhost``), like the real CDN, so the client
                                                           drops its Authorization header for the blob itself.

Every commit is an immutable snapshot {path: entry}; a branch only moves when a commit fully succeeded, so a
failed commit changes nothing. Auth follows the Hub: an unknown token is 401 everywhere; private repos look
missing (401 without a token, 404 with one) to those who may not read them; gated repos show their metadata but
answer ``GatedRepo`` on downloads until access is granted; writing needs a write token of the namespace's user or
an org member. ``fail_next(op, ...)`` injects faults (``commit``, ``lfs_put``, ``lfs_verify``, ``lfs_batch``,
``preupload``, ``create``, ``resolve``); ``counts`` / ``log`` record what the client did.

Only for tests: binds 127.0.0.1 on an ephemeral port and stores everything under a temporary folder.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

import yaml

LFS_EXTENSIONS = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".h5", ".msgpack", ".model",
                  ".npz", ".npy", ".pkl", ".pickle", ".zip", ".tar", ".gz", ".7z", ".png", ".jpg", ".jpeg",
                  ".wasm", ".tflite", ".ot", ".parquet", ".arrow", ".imatrix")
LFS_THRESHOLD = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"*{ext} filter=lfs diff=lfs merge=lfs -text\n" for ext in LFS_EXTENSIONS)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
SHA_RE = re.compile(r"^[0-9a-f]{40}$")


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(t))


@dataclass(frozen=True)
class Entry:
    """One file in a commit."""

    path: str
    size: int
    oid: str  # git blob oid (of the content, or of the LFS pointer)
    lfs: str | None = None  # sha256 of the content when stored in LFS

    def tree_json(self, expand: bool = False, commit: "Commit | None" = None) -> dict:
        d = {"type": "file", "oid": self.oid, "size": self.size, "path": self.path}
        if self.lfs:
            d["lfs"] = {"oid": self.lfs, "size": self.size, "pointerSize": len(lfs_pointer(self.lfs, self.size))}
        if expand and commit is not None:
            d["lastCommit"] = {"id": commit.sha, "title": commit.summary, "date": _iso(commit.time)}
            d["securityFileStatus"] = {"status": "safe"}
        return d


@dataclass(frozen=True)
class Commit:
    sha: str
    parent: str | None
    files: dict  # path -> Entry (never mutated after creation)
    summary: str
    description: str
    author: str
    time: float


@dataclass
class Repo:
    id: str
    private: bool
    gated: str | bool = False  # False | "auto" | "manual"
    granted: set = field(default_factory=set)  # users given access to a gated repo
    commits: dict = field(default_factory=dict)  # sha -> Commit
    refs: dict = field(default_factory=dict)  # "main" / "refs/pr/1" / tag -> sha
    tags: set = field(default_factory=set)
    lfs_oids: set = field(default_factory=set)  # LFS objects uploaded and verified for this repo
    prs: int = 0
    created: float = field(default_factory=time.time)

    @property
    def namespace(self) -> str:
        return self.id.split("/")[0]


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None,
                 extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.extra = extra or {}


class _Drop(Exception):
    """Raised inside a handler to cut the connection without a response."""


class HubState:
    """Users, repos and blobs of the fake Hub (thread-safe through one lock)."""

    def __init__(self, root: Path):
        self.root = root
        self.lock = threading.RLock()
        self.users: dict[str, dict] = {}  # token -> {"name", "orgs", "role"}
        self.orgs: set[str] = set()
        self.repos: dict[str, Repo] = {}
        self.faults: list[dict] = []
        self.counts: Counter = Counter()
        self.log: list[tuple[str, str, int]] = []  # (method, path, status); never the token
        self.secret = secrets.token_bytes(16)
        self._commit_seq = 0
        (root / "objects").mkdir(parents=True, exist_ok=True)
        (root / "lfs").mkdir(parents=True, exist_ok=True)
        (root / "incoming").mkdir(parents=True, exist_ok=True)

    # -- users ------------------------------------------------------------------------------------------------------
    def add_user(self, name: str, token: str | None = None, orgs=(), role: str = "write") -> str:
        token = token or "hf_" + secrets.token_hex(17)
        with self.lock:
            self.users[token] = {"name": name, "orgs": list(orgs), "role": role}
            self.orgs.update(orgs)
        return token

    def user_for(self, token: str | None) -> dict | None:
        if token is None:
            return None
        user = self.users.get(token)
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    # -- blobs --------------------------------------------------------------------------------------------------------
    def _store_regular(self, data: bytes) -> str:
        oid = git_blob_oid(data)
        p = self.root / "objects" / oid
        if not p.exists():
            tmp = p.with_suffix(".tmp" + secrets.token_hex(4))
            tmp.write_bytes(data)
            os.replace(tmp, p)
        return oid

    def blob_path(self, entry: Entry) -> Path:
        return self.root / ("lfs" if entry.lfs else "objects") / (entry.lfs or entry.oid)

    def read(self, entry: Entry) -> bytes:
        return self.blob_path(entry).read_bytes()

    # -- permissions ------------------------------------------------------------------------------------------------
    def can_write_namespace(self, user: dict | None, namespace: str) -> bool:
        return bool(user) and user["role"] == "write" and (namespace == user["name"] or namespace in user["orgs"])

    def is_member(self, user: dict | None, namespace: str) -> bool:
        return bool(user) and (namespace == user["name"] or namespace in user["orgs"])

    def get_repo(self, repo_id: str, user: dict | None, *, write: bool = False, download: bool = False) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not self.is_member(user, repo.namespace)):
            raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        if write:
            if not self.can_write_namespace(user, repo.namespace):
                raise HubError(403, f"You don't have the rights to write to {repo_id}: "
                               f"your token cannot write in the namespace {repo.namespace!r}")
        elif download and repo.gated and not self.is_member(user, repo.namespace) and \
                (user is None or user["name"] not in repo.granted):
            raise HubError(401 if user is None else 403,
                           f"Access to model {repo_id} is restricted. You must have access to it and be "
                           "authenticated to access it. Please log in.", "GatedRepo")
        return repo

    def resolve_rev(self, repo: Repo, rev: str | None) -> Commit:
        rev = rev or "main"
        sha = repo.refs.get(rev)
        if sha is None and SHA_RE.match(rev) and rev in repo.commits:
            sha = rev
        if sha is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return repo.commits[sha]

    # -- faults -----------------------------------------------------------------------------------------------------
    def fail_next(self, op: str, *, status: int = 400, times: int = 1, after_bytes: int | None = None,
                  drop: bool = False, message: str = "fault injected by the test Hub") -> None:
        """Make the next ``times`` requests of kind ``op`` fail with ``status``.

        ``commit`` fails in the middle of applying the NDJSON operations (after some blobs were stored);
        ``lfs_put`` reads ``after_bytes`` (default: half) of the upload, then fails -- or, with ``drop``, closes
        the connection without answering (a network cut). Status 4xx is not retried by huggingface_hub; 5xx
        and cut connections are, with back-off (1 s, 2 s, 4 s ...).
        """
        with self.lock:
            self.faults.append({"op": op, "status": status, "times": times, "after_bytes": after_bytes,
                                "drop": drop, "message": message})

    def take_fault(self, op: str) -> dict | None:
        with self.lock:
            for f in self.faults:
                if f["op"] == op and f["times"] > 0:
                    f["times"] -= 1
                    if f["times"] == 0:
                        self.faults.remove(f)
                    self.counts[f"fault:{op}"] += 1
                    return f
        return None

    # -- repos and commits -------------------------------------------------------------------------------------------
    def _new_sha(self, *parts) -> str:
        self._commit_seq += 1
        return hashlib.sha1(json.dumps([self._commit_seq, time.time(), *parts], default=str).encode()).hexdigest()

    def create_repo(self, repo_id: str, *, private: bool = False, gated=False, author: str = "hub") -> Repo:
        with self.lock:
            if repo_id in self.repos:
                raise HubError(409, "You already created this model repo")
            repo = Repo(id=repo_id, private=private, gated=gated)
            oid = self._store_regular(GITATTRIBUTES.encode())
            files = {".gitattributes": Entry(".gitattributes", len(GITATTRIBUTES), oid)}
            sha = self._new_sha(repo_id, "initial")
            repo.commits[sha] = Commit(sha, None, files, "initial commit", "", author, time.time())
            repo.refs["main"] = sha
            self.repos[repo_id] = repo
            return repo

    def apply_commit(self, repo: Repo, branch: str, ops: list[dict], *, summary: str, description: str = "",
                     author: str, parent: str | None = None, create_pr: bool = False,
                     fault: dict | None = None) -> tuple[Commit, str]:
        """Build a new snapshot from ``ops``; move the branch only when all of it succeeded."""
        with self.lock:
            if branch not in repo.refs:
                if SHA_RE.match(branch):
                    raise HubError(400, "Cannot commit to a commit id: give a branch name")
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            head = repo.commits[repo.refs[branch]]
            if parent is not None and parent != head.sha:
                raise HubError(412, f"A commit has happened since. Parent commit {parent} is not the head "
                                    f"{head.sha} of {branch}")
            files = dict(head.files)
            for i, op in enumerate(ops):
                if fault is not None and i >= max(1, len(ops) // 2):
                    raise HubError(fault["status"], fault["message"] + " (commit aborted mid-way)")
                key, value = op.get("key"), op.get("value") or {}
                path = value.get("path", "")
                if key == "file":
                    data = base64.b64decode(value["content"]) if value.get("encoding") == "base64" else \
                        value["content"].encode()
                    files[path] = Entry(path, len(data), self._store_regular(data))
                elif key == "lfsFile":
                    oid = value["oid"]
                    if oid not in repo.lfs_oids or not (self.root / "lfs" / oid).exists():
                        raise HubError(422, f"LFS object {oid} for {path} was not uploaded")
                    size = (self.root / "lfs" / oid).stat().st_size
                    files[path] = Entry(path, size, git_blob_oid(lfs_pointer(oid, size)), lfs=oid)
                elif key == "deletedFile":
                    if path not in files:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    del files[path]
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    gone = [p for p in files if p.startswith(prefix)]
                    if not gone:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in gone:
                        del files[p]
                else:
                    raise HubError(400, f"Unknown commit operation {key!r}")
            sha = self._new_sha(repo.id, head.sha, sorted((p, e.oid) for p, e in files.items()), summary)
            commit = Commit(sha, head.sha, files, summary, description, author, time.time())
            repo.commits[sha] = commit
            ref = branch
            if create_pr:
                repo.prs += 1
                ref = f"refs/pr/{repo.prs}"
            repo.refs[ref] = sha
            return commit, ref

    def seed(self, repo_id: str, folder: str | os.PathLike | None = None, *, files: dict | None = None,
             private: bool = False, gated=False, message: str = "seed") -> str:
        """Create (or add a commit to) ``repo_id`` with every file of ``folder`` (+ ``files``: {path: bytes})."""
        with self.lock:
            repo = self.repos.get(repo_id) or self.create_repo(repo_id, private=private, gated=gated)
            repo.private, repo.gated = private, gated
            ops = []
            items: dict[str, bytes | Path] = {}
            if folder is not None:
                folder = Path(folder)
                for p in sorted(folder.rglob("*")):
                    if p.is_file():
                        items[p.relative_to(folder).as_posix()] = p
            items.update(files or {})
            for path, src in items.items():
                data = src.read_bytes() if isinstance(src, Path) else (src.encode() if isinstance(src, str) else src)
                if _wants_lfs(path, len(data), data[:512]):
                    oid = hashlib.sha256(data).hexdigest()
                    (self.root / "lfs" / oid).write_bytes(data)
                    repo.lfs_oids.add(oid)
                    ops.append({"key": "lfsFile", "value": {"path": path, "oid": oid, "algo": "sha256"}})
                else:
                    ops.append({"key": "file", "value": {"path": path, "encoding": "base64",
                                                         "content": base64.b64encode(data).decode()}})
            commit, _ = self.apply_commit(repo, "main", ops, summary=message, author=repo.namespace)
            return commit.sha


def _wants_lfs(path: str, size: int, sample: bytes) -> bool:
    return path.lower().endswith(LFS_EXTENSIONS) or size >= LFS_THRESHOLD or b"\0" in sample


def _card_data(text: str) -> dict | None:
    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not m:
        return None
    try:
        data = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "quantkit-test-hub/1"
    hub: "HubServer"

    def log_message(self, fmt, *args):  # quiet
        pass

    # -- plumbing --------------------------------------------------------------------------------------------------
    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                line = self.rfile.readline()
                n = int(line.split(b";")[0].strip() or b"0", 16)
                if n == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(n)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: bytes | None = b"", headers: dict | None = None,
              content_type: str = "application/json", head: bool = False, length: int | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body or b"") if length is None else length))
        self.end_headers()
        if body and not head:
            self.wfile.write(body)
        self.hub.state.log.append((self.command, urlsplit(self.path).path, status))

    def _json(self, obj, status: int = 200, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _error(self, e: HubError) -> None:
        headers = dict(e.headers)
        if e.code:
            headers["X-Error-Code"] = e.code
        headers["X-Error-Message"] = e.message.encode("ascii", "replace").decode()
        self._send(e.status, json.dumps({"error": e.message, **e.extra}).encode(), headers, head=self.command == "HEAD")

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        return auth[7:].strip() if auth.lower().startswith("bearer ") else None

    def _user(self) -> dict | None:
        return self.hub.state.user_for(self._token())

    def _dispatch(self) -> None:
        try:
            split = urlsplit(self.path)
            raw = [p for p in split.path.split("/") if p != ""]
            query = parse_qs(split.query)
            route = self._route(raw, query)
            streams = route is not None and route[0] == self.lfs_put  # the LFS PUT streams its own body
            body = self._read_body() if self.command in ("POST", "PUT", "DELETE") and not streams else None
            if route is None:
                raise HubError(404, f"no route for {self.command} {split.path}")
            fn, args = route
            fn(*args, body=body, query=query)
        except HubError as e:
            self._error(e)
        except _Drop:
            self.close_connection = True  # no answer at all: the client sees the connection cut
            self.hub.state.log.append((self.command, urlsplit(self.path).path, 0))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # a bug in the test server: say so loudly
            import traceback

            traceback.print_exc()
            self._error(HubError(500, f"test hub bug: {type(e).__name__}: {e}"))

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _dispatch

    def _route(self, raw: list[str], query: dict):
        m, n = self.command, len(raw)
        if raw[:1] == ["api"]:
            if raw[1:] == ["whoami-v2"] and m == "GET":
                return self.whoami, ()
            if raw[1:] == ["validate-yaml"] and m == "POST":
                return self.validate_yaml, ()
            if raw[1:3] == ["repos", "create"] and m == "POST":
                return self.create_repo, ()
            if raw[1:3] == ["repos", "delete"] and m in ("POST", "DELETE"):
                return self.delete_repo, ()
            if n >= 4 and raw[1] == "models":
                repo_id = f"{unquote(raw[2])}/{unquote(raw[3])}"
                rest = raw[4:]
                if not rest and m == "GET":
                    return self.model_info, (repo_id, None)
                if len(rest) == 2 and rest[0] == "revision" and m == "GET":
                    return self.model_info, (repo_id, unquote(rest[1]))
                if rest[:1] == ["tree"] and len(rest) >= 2 and m == "GET":
                    return self.tree, (repo_id, unquote(rest[1]), "/".join(unquote(p) for p in rest[2:]))
                if rest[:1] == ["paths-info"] and len(rest) == 2 and m == "POST":
                    return self.paths_info, (repo_id, unquote(rest[1]))
                if rest[:1] == ["preupload"] and len(rest) == 2 and m == "POST":
                    return self.preupload, (repo_id, unquote(rest[1]))
                if rest[:1] == ["commit"] and len(rest) == 2 and m == "POST":
                    return self.commit, (repo_id, unquote(rest[1]))
                if rest == ["refs"] and m == "GET":
                    return self.refs, (repo_id,)
                if rest[:1] == ["branch"] and len(rest) >= 2 and m in ("POST", "DELETE"):
                    return self.branch, (repo_id, unquote("/".join(rest[1:])))
                if rest[:1] == ["commits"] and len(rest) == 2 and m == "GET":
                    return self.commits, (repo_id, unquote(rest[1]))
                if rest == ["settings"] and m == "PUT":
                    return self.settings, (repo_id,)
            return None
        if raw[:1] == ["lfs-upload"] and n == 4 and m == "PUT":
            return self.lfs_put, (f"{unquote(raw[1])}/{unquote(raw[2])}", raw[3])
        if raw[:1] == ["lfs-verify"] and n == 4 and m == "POST":
            return self.lfs_verify, (f"{unquote(raw[1])}/{unquote(raw[2])}", raw[3])
        if raw[:1] == ["lfs-cdn"] and n == 2 and m in ("GET", "HEAD"):
            return self.cdn, (raw[1],)
        if n >= 6 and raw[1].endswith(".git") and raw[2:6] == ["info", "lfs", "objects", "batch"] and m == "POST":
            return self.lfs_batch, (f"{unquote(raw[0])}/{unquote(raw[1])[:-4]}",)
        if n >= 5 and raw[2] == "resolve" and m in ("GET", "HEAD"):
            return self.resolve, (f"{unquote(raw[0])}/{unquote(raw[1])}", unquote(raw[3]),
                                  "/".join(unquote(p) for p in raw[4:]))
        return None

    @property
    def base(self) -> str:
        return self.hub.endpoint

    # -- endpoints ---------------------------------------------------------------------------------------------------
    def whoami(self, body, query):
        user = self._user()
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        self._json({
            "type": "user", "id": hashlib.md5(user["name"].encode()).hexdigest()[:24], "name": user["name"],
            "fullname": user["name"].title(), "email": f"{user['name']}@example.invalid", "emailVerified": True,
            "isPro": False, "canPay": False,
            "orgs": [{"type": "org", "name": o, "fullname": o, "roleInOrg": "write" if user["role"] == "write"
                      else "read"} for o in user["orgs"]],
            "auth": {"type": "access_token",
                     "accessToken": {"displayName": "test", "role": user["role"], "createdAt": _iso(0)}},
        })

    def validate_yaml(self, body, query):
        content = json.loads(body or b"{}").get("content", "")
        m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.S)
        if m:
            try:
                meta = yaml.safe_load(m.group(1))
            except yaml.YAMLError as e:
                self._json({"errors": [{"message": f"YAML parse error: {e}"}]}, 400)
                return
            if meta is not None and not isinstance(meta, dict):
                self._json({"errors": [{"message": "metadata must be a YAML mapping"}]}, 400)
                return
            problems = []
            if isinstance(meta, dict):
                if "license" in meta and not isinstance(meta["license"], str):
                    problems.append("\"license\" must be a string")
                if "tags" in meta and not (isinstance(meta["tags"], list) and
                                           all(isinstance(t, str) for t in meta["tags"])):
                    problems.append("\"tags\" must be a list of strings")
                if "base_model" in meta and not isinstance(meta["base_model"], (str, list)):
                    problems.append("\"base_model\" must be a string or a list of strings")
            if problems:
                self._json({"errors": [{"message": p} for p in problems]}, 400)
                return
        self._json({"errors": [], "warnings": []})

    def create_repo(self, body, query):
        st = self.hub.state
        fault = st.take_fault("create")
        if fault:
            raise HubError(fault["status"], fault["message"])
        user = self._user()
        if user is None:
            raise HubError(401, "Invalid username or password.")
        payload = json.loads(body or b"{}")
        if payload.get("type", "model") not in ("model", None):
            raise HubError(400, "this test hub only knows model repos")
        name, ns = payload.get("name") or "", payload.get("organization") or user["name"]
        if not NAME_RE.match(name) or "--" in name or name.endswith((".git", ".")):
            raise HubError(400, f"Invalid repo name {name!r}")
        repo_id = f"{ns}/{name}"
        if not st.can_write_namespace(user, ns):
            if ns != user["name"] and ns not in user["orgs"]:
                msg = f"You don't have the rights to create a model under the namespace \"{ns}\""
            else:
                msg = "Your token has read access only: it cannot create repositories"
            raise HubError(403, msg)
        private = payload.get("private")
        if payload.get("visibility") is not None:
            private = payload["visibility"] == "private"
        with st.lock:
            if repo_id in st.repos:
                raise HubError(409, "You already created this model repo",
                               extra={"url": f"{self.base}/{repo_id}"})
            st.create_repo(repo_id, private=bool(private), author=user["name"])
        st.counts["create"] += 1
        self._json({"url": f"{self.base}/{repo_id}", "name": repo_id, "id": repo_id})

    def delete_repo(self, body, query):
        st, user = self.hub.state, self._user()
        payload = json.loads(body or b"{}")
        repo_id = f"{payload.get('organization') or (user or {}).get('name')}/{payload.get('name')}"
        with st.lock:
            st.get_repo(repo_id, user, write=True)
            del st.repos[repo_id]
        self._json({})

    def settings(self, repo_id, body, query):
        st, user = self.hub.state, self._user()
        payload = json.loads(body or b"{}")
        with st.lock:
            repo = st.get_repo(repo_id, user, write=True)
            if payload.get("private") is not None:
                repo.private = bool(payload["private"])
            if payload.get("visibility") is not None:
                repo.private = payload["visibility"] == "private"
            if payload.get("gated") is not None:
                repo.gated = payload["gated"] or False
        self._json({})

    def model_info(self, repo_id, rev, body, query):
        st, user = self.hub.state, self._user()
        with st.lock:
            repo = st.get_repo(repo_id, user)
            commit = st.resolve_rev(repo, rev)
            blobs = "blobs" in query
            siblings = []
            for p, e in sorted(commit.files.items()):
                s = {"rfilename": p}
                if blobs:
                    s.update({"size": e.size, "blobId": e.oid})
                    if e.lfs:
                        s["lfs"] = {"size": e.size, "sha256": e.lfs,
                                    "pointerSize": len(lfs_pointer(e.lfs, e.size))}
                siblings.append(s)
            card = None
            if "README.md" in commit.files:
                card = _card_data(st.read(commit.files["README.md"]).decode("utf-8", "replace"))
            tags = list((card or {}).get("tags") or [])
            if isinstance((card or {}).get("license"), str):
                tags.append(f"license:{card['license']}")
            info = {
                "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id,
                "author": repo.namespace, "sha": commit.sha, "lastModified": _iso(commit.time),
                "createdAt": _iso(repo.created), "private": repo.private, "gated": repo.gated, "disabled": False,
                "downloads": 0, "likes": 0, "tags": tags, "siblings": siblings, "spaces": [],
                "usedStorage": sum(e.size for e in commit.files.values()),
            }
            if card is not None:
                info["cardData"] = card
                for k in ("pipeline_tag", "library_name"):
                    if isinstance(card.get(k), str):
                        info[k] = card[k]
        self._json(info)

    def _entries_json(self, commit: Commit, paths: list[str] | None, prefix: str, recursive: bool,
                      expand: bool) -> list[dict]:
        out = []
        if paths is not None:  # paths-info
            for p in paths:
                p = p.strip("/")
                if p in commit.files:
                    out.append(commit.files[p].tree_json(expand, commit))
                elif any(f.startswith(p + "/") for f in commit.files):
                    out.append({"type": "directory", "oid": hashlib.sha1(p.encode()).hexdigest(), "size": 0,
                                "path": p})
            return out
        prefix = prefix.strip("/")
        pre = prefix + "/" if prefix else ""
        if prefix and prefix in commit.files:
            return [commit.files[prefix].tree_json(expand, commit)]
        dirs = set()
        for p, e in sorted(commit.files.items()):
            if not p.startswith(pre):
                continue
            rest = p[len(pre):]
            if "/" in rest:
                parts = rest.split("/")
                for i in range(1, len(parts) if recursive else 2):
                    d = pre + "/".join(parts[:i])
                    if d not in dirs:
                        dirs.add(d)
                        out.append({"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0,
                                    "path": d})
                if not recursive:
                    continue
            out.append(e.tree_json(expand, commit))
        if prefix and not out:
            raise HubError(404, f"{prefix} does not exist", "EntryNotFound")
        return out

    def tree(self, repo_id, rev, path, body, query):
        st, user = self.hub.state, self._user()
        recursive = (query.get("recursive") or ["false"])[0].lower() in ("1", "true")
        expand = (query.get("expand") or ["false"])[0].lower() in ("1", "true")
        with st.lock:
            repo = st.get_repo(repo_id, user)
            commit = st.resolve_rev(repo, rev)
            entries = self._entries_json(commit, None, path, recursive, expand)
        self._json(entries)

    def paths_info(self, repo_id, rev, body, query):
        st, user = self.hub.state, self._user()
        ctype = self.headers.get("Content-Type", "")
        if "json" in ctype:
            payload = json.loads(body or b"{}")
            paths, expand = payload.get("paths") or [], bool(payload.get("expand"))
        else:
            form = parse_qs((body or b"").decode())
            paths, expand = form.get("paths", []), (form.get("expand") or ["false"])[0].lower() == "true"
        with st.lock:
            repo = st.get_repo(repo_id, user)
            commit = st.resolve_rev(repo, rev)
            entries = self._entries_json(commit, paths, "", True, expand)
        self._json(entries)

    def preupload(self, repo_id, rev, body, query):
        st, user = self.hub.state, self._user()
        fault = st.take_fault("preupload")
        if fault:
            raise HubError(fault["status"], fault["message"])
        payload = json.loads(body or b"{}")
        with st.lock:
            repo = st.get_repo(repo_id, user, write=True)
            commit = st.resolve_rev(repo, rev)
            files = []
            for f in payload.get("files", []):
                sample = base64.b64decode(f.get("sample") or "")
                mode = "lfs" if _wants_lfs(f["path"], int(f.get("size") or 0), sample) else "regular"
                e = commit.files.get(f["path"])
                files.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False,
                              "oid": (e.lfs or e.oid) if e is not None and (e.lfs is not None) == (mode == "lfs")
                              else None})
        st.counts["preupload"] += 1
        self._json({"files": files, "commitOid": commit.sha})

    def _sig(self, *parts: str) -> str:
        return hmac.new(self.hub.state.secret, "\0".join(parts).encode(), "sha256").hexdigest()[:32]

    def lfs_batch(self, repo_id, body, query):
        st, user = self.hub.state, self._user()
        fault = st.take_fault("lfs_batch")
        if fault:
            raise HubError(fault["status"], fault["message"])
        payload = json.loads(body or b"{}")
        if payload.get("operation") != "upload":
            raise HubError(400, "this test hub only does LFS uploads through the batch API")
        with st.lock:
            repo = st.get_repo(repo_id, user, write=True)
            objects = []
            for o in payload.get("objects", []):
                oid, size = o["oid"], int(o["size"])
                obj = {"oid": oid, "size": size, "authenticated": True}
                if oid in repo.lfs_oids and (st.root / "lfs" / oid).exists():
                    pass  # already there: no actions, nothing to upload
                else:
                    sig = self._sig(repo_id, oid, str(size))
                    q = quote(repo_id, safe="/")
                    obj["actions"] = {
                        "upload": {"href": f"{self.base}/lfs-upload/{q}/{oid}?size={size}&sig={sig}",
                                   "header": {}},
                        "verify": {"href": f"{self.base}/lfs-verify/{q}/{oid}?sig={sig}&size={size}",
                                   "header": {}},
                    }
                objects.append(obj)
        st.counts["lfs_batch"] += 1
        self._json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                   headers={"Content-Type": "application/vnd.git-lfs+json"})

    def lfs_put(self, repo_id, oid, body, query):
        st = self.hub.state
        size = int((query.get("size") or ["-1"])[0])
        if not hmac.compare_digest((query.get("sig") or [""])[0], self._sig(repo_id, oid, str(size))):
            self._read_body()
            raise HubError(403, "bad upload signature")
        fault = st.take_fault("lfs_put")
        tmp = st.root / "incoming" / f"{oid}.{secrets.token_hex(6)}"
        h = hashlib.sha256()
        got = 0
        try:
            with open(tmp, "wb") as f:
                chunked = self.headers.get("Transfer-Encoding", "").lower() == "chunked"
                if chunked:
                    data = self._read_body()
                    if fault:
                        data = data[:fault["after_bytes"] if fault["after_bytes"] is not None else len(data) // 2]
                    f.write(data)
                    h.update(data)
                    got = len(data)
                else:
                    remaining = int(self.headers.get("Content-Length") or 0)
                    stop = remaining if not fault else (fault["after_bytes"] if fault["after_bytes"] is not None
                                                        else remaining // 2)
                    while remaining > 0:
                        if fault and fault.get("drop") and got >= stop:
                            break  # stop reading: the unread rest makes the close a connection reset
                        block = self.rfile.read(min(1 << 20, remaining, max(1, stop - got) if fault else 1 << 20))
                        if not block:
                            break
                        remaining -= len(block)
                        keep = block[:max(0, stop - got)]
                        f.write(keep)
                        h.update(keep)
                        got += len(keep)
            if fault and fault.get("drop"):
                raise _Drop()
            if fault:
                raise HubError(fault["status"], fault["message"] + f" (upload aborted after {got} bytes)")
            if got != size or h.hexdigest() != oid:
                raise HubError(400, f"uploaded content does not match oid {oid} / size {size}")
            os.replace(tmp, st.root / "lfs" / oid)
        finally:
            if tmp.exists():
                tmp.unlink()
        st.counts["lfs_put"] += 1
        st.counts["lfs_put_bytes"] += got
        self._send(200, b"", {"ETag": f'"{oid}"'})

    def lfs_verify(self, repo_id, oid, body, query):
        st = self.hub.state
        fault = st.take_fault("lfs_verify")
        if fault:
            raise HubError(fault["status"], fault["message"])
        payload = json.loads(body or b"{}")
        p = st.root / "lfs" / oid
        if payload.get("oid") != oid or not p.exists() or p.stat().st_size != int(payload.get("size", -1)):
            raise HubError(404, f"LFS object {oid} not found or of the wrong size")
        with st.lock:
            st.repos[repo_id].lfs_oids.add(oid)
        st.counts["lfs_verify"] += 1
        self._json({"success": True})

    def commit(self, repo_id, rev, body, query):
        st, user = self.hub.state, self._user()
        create_pr = (query.get("create_pr") or ["0"])[0] in ("1", "true", "True")
        lines = [json.loads(line) for line in (body or b"").splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the commit payload must start with a header line")
        header = lines[0]["value"]
        with st.lock:
            repo = st.get_repo(repo_id, user, write=True)
            fault = st.take_fault("commit")
            commit, ref = st.apply_commit(repo, rev, lines[1:], summary=header.get("summary") or "",
                                          description=header.get("description") or "", author=user["name"],
                                          parent=header.get("parentCommit"), create_pr=create_pr, fault=fault)
        st.counts["commit"] += 1
        out = {"success": True, "commitOid": commit.sha, "commitUrl": f"{self.base}/{repo_id}/commit/{commit.sha}"}
        if create_pr:
            out["pullRequestUrl"] = f"{self.base}/{repo_id}/discussions/{ref.rsplit('/', 1)[-1]}"
        self._json(out)

    def refs(self, repo_id, body, query):
        st, user = self.hub.state, self._user()
        with st.lock:
            repo = st.get_repo(repo_id, user)
            branches = [{"name": r, "ref": f"refs/heads/{r}", "targetCommit": s} for r, s in repo.refs.items()
                        if not r.startswith("refs/") and r not in repo.tags]
            tags = [{"name": r, "ref": f"refs/tags/{r}", "targetCommit": s} for r, s in repo.refs.items()
                    if r in repo.tags]
            prs = [{"name": r, "ref": r, "targetCommit": s} for r, s in repo.refs.items() if r.startswith("refs/pr/")]
        out = {"branches": branches, "converts": [], "tags": tags}
        if query.get("include_prs"):
            out["pullRequests"] = prs
        self._json(out)

    def branch(self, repo_id, name, body, query):
        st, user = self.hub.state, self._user()
        with st.lock:
            repo = st.get_repo(repo_id, user, write=True)
            if self.command == "DELETE":
                if name not in repo.refs or name == "main":
                    raise HubError(404, f"Invalid rev id: {name}", "RevisionNotFound")
                del repo.refs[name]
            else:
                if name in repo.refs:
                    raise HubError(409, f"Reference {name} already exists")
                payload = json.loads(body or b"{}")
                start = st.resolve_rev(repo, payload.get("startingPoint") or "main")
                repo.refs[name] = start.sha
        self._json({})

    def commits(self, repo_id, rev, body, query):
        st, user = self.hub.state, self._user()
        with st.lock:
            repo = st.get_repo(repo_id, user)
            c = st.resolve_rev(repo, rev)
            out = []
            while c is not None:
                out.append({"id": c.sha, "title": c.summary, "message": c.description, "date": _iso(c.time),
                            "authors": [{"user": c.author}]})
                c = repo.commits.get(c.parent) if c.parent else None
        self._json(out)

    def resolve(self, repo_id, rev, path, body, query):
        st, user = self.hub.state, self._user()
        head = self.command == "HEAD"
        fault = st.take_fault("resolve")
        if fault:
            raise HubError(fault["status"], fault["message"])
        with st.lock:
            repo = st.get_repo(repo_id, user, download=True)
            commit = st.resolve_rev(repo, rev)
            entry = commit.files.get(path)
            if entry is None:
                raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        common = {"X-Repo-Commit": commit.sha, "Accept-Ranges": "bytes"}
        if entry.lfs:
            exp = str(int(time.time()) + 3600)
            sig = self._sig(entry.lfs, exp)
            loc = f"http://localhost:{self.hub.port}/lfs-cdn/{entry.lfs}?exp={exp}&sig={sig}"
            if not head:
                st.counts["download"] += 1
            self._send(302, b"", {**common, "Location": loc, "ETag": f'"{entry.oid}"',
                                  "X-Linked-Etag": f'"{entry.lfs}"', "X-Linked-Size": entry.size}, head=head)
            return
        data = st.read(entry)
        if not head:
            st.counts["download"] += 1
        self._send_range(data, {**common, "ETag": f'"{entry.oid}"'}, head)

    def _send_range(self, data: bytes, headers: dict, head: bool, content_type="application/octet-stream"):
        rng = self.headers.get("Range")
        m = re.match(r"bytes=(\d+)-(\d*)$", rng or "")
        if m:
            start = int(m.group(1))
            end = int(m.group(2)) if m.group(2) else len(data) - 1
            part = data[start:end + 1]
            self._send(206, part, {**headers, "Content-Range": f"bytes {start}-{start + len(part) - 1}/{len(data)}"},
                       content_type, head)
        else:
            self._send(200, data, headers, content_type, head)

    def cdn(self, oid, body, query):
        exp = (query.get("exp") or ["0"])[0]
        if int(exp) < time.time() or not hmac.compare_digest((query.get("sig") or [""])[0], self._sig(oid, exp)):
            raise HubError(403, "signature expired or invalid")
        p = self.hub.state.root / "lfs" / oid
        if not p.exists():
            raise HubError(404, "no such object")
        self._send_range(p.read_bytes(), {"ETag": f'"{oid}"'}, self.command == "HEAD")


class HubServer:
    """The test Hub: ``start()`` it, point ``HF_ENDPOINT`` at ``endpoint``, ``stop()`` it."""

    def __init__(self, root: str | os.PathLike | None = None):
        self._own_root = root is None
        self.root = Path(root or tempfile.mkdtemp(prefix="quantkit-hub-"))
        self.state = HubState(self.root / "store")
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "HubServer":
        handler = type("Handler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="test-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def reset(self) -> None:
        """Forget every user, repo, blob, fault and count (between tests)."""
        old = self.state
        self.state = HubState(self.root / f"store-{secrets.token_hex(4)}")
        shutil.rmtree(old.root, ignore_errors=True)

    # -- conveniences for tests ----------------------------------------------------------------------------------------
    def add_user(self, name: str, token: str | None = None, orgs=(), role: str = "write") -> str:
        return self.state.add_user(name, token, orgs, role)

    def seed(self, repo_id: str, folder=None, *, files: dict | None = None, private: bool = False, gated=False,
             message: str = "seed") -> str:
        return self.state.seed(repo_id, folder, files=files, private=private, gated=gated, message=message)

    def grant(self, repo_id: str, user: str) -> None:
        self.state.repos[repo_id].granted.add(user)

    def fail_next(self, op: str, **kw) -> None:
        self.state.fail_next(op, **kw)

    @property
    def counts(self) -> Counter:
        return self.state.counts

    def repo(self, repo_id: str) -> Repo:
        return self.state.repos[repo_id]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """{path: content} of a repo at a revision (read straight from storage, no auth)."""
        repo = self.state.repos[repo_id]
        commit = self.state.resolve_rev(repo, revision)
        return {p: self.state.read(e) for p, e in commit.files.items()}

    def head(self, repo_id: str, revision: str = "main") -> str:
        return self.state.repos[repo_id].refs[revision]

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":  # a manual playground: python tests/hubserver.py
    with HubServer() as hub:
        tok = hub.add_user("alice", orgs=["alice-org"])
        print(f"HF_ENDPOINT={hub.endpoint} HF_TOKEN={tok} HF_HUB_DISABLE_XET=1  (Ctrl-C to stop)")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
