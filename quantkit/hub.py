"""Pull base models from the Hub (or take a local folder), push artifacts back.

MODEL is always either a Hub id (``org/name`` + optional revision) or a local folder. Pulling resolves the
revision to a commit SHA, downloads only safetensors + config + tokenizer + generation config + licence /
README files, and refuses pickle ``.bin`` weights unless ``allow_pickle``. The token comes from
huggingface_hub's usual places (``HF_TOKEN``, ``hf auth login``) and is never printed or written by us.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from quantkit import trust
from quantkit.errors import QuantkitError, hub_error, is_network_error

log = logging.getLogger(__name__)

HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

# What a conversion needs; everything else in a repo (other formats, pictures, onnx, ...) stays remote.
BASE_PATTERNS = [
    "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "preprocessor_config.json",
    "README.md", "LICENSE", "LICENSE*", "LICENCE*", "license*", "USE_POLICY.md", "NOTICE*",
]
SAFETENSORS_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
PICKLE_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]


@dataclass
class ModelSource:
    """A base model resolved to a local folder and a fixed revision."""

    path: Path
    id: str | None = None  # Hub id, None for a plain local folder
    revision: str | None = None  # what the user asked for (branch/tag/sha)
    sha: str = ""  # commit SHA on the Hub, or "local-<hash>" for a local folder
    license: str | None = None
    license_name: str | None = None
    license_link: str | None = None
    pipeline_tag: str | None = None
    config: dict = field(default_factory=dict)
    # the model's own Python (quantkit.trust): the files that would run, and whether the user allowed them; when
    # they are not allowed, ``path`` is the folder's code-free view and ``origin`` the folder itself
    code_files: list[str] = field(default_factory=list)
    trust_remote_code: bool = False
    origin: Path | None = None

    @property
    def name(self) -> str:
        """Model name used in output names: ``Qwen/Qwen2.5-0.5B-Instruct`` -> ``Qwen2.5-0.5B-Instruct``."""
        return (self.id or str(self.path.resolve())).rstrip("/").split("/")[-1]

    @property
    def architecture(self) -> str | None:
        archs = self.config.get("architectures") or []
        return archs[0] if archs else None

    def manifest_base(self) -> dict:
        return {
            "id": self.id,
            "revision": self.revision,
            "sha": self.sha,
            "license": self.license,
            "license_name": self.license_name,
            "license_link": self.license_link,
            "pipeline_tag": self.pipeline_tag or "text-generation",
            "model_name": self.name,
            "architecture": self.architecture,
            "model_type": self.config.get("model_type"),
            "local_path": str(self.origin or self.path),
            **({"code_files": self.code_files, "trust_remote_code": self.trust_remote_code}
               if self.code_files else {}),
        }

    def to_json(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        d["origin"] = str(self.origin) if self.origin else None
        d["name"] = self.name
        return d


def is_local(model: str) -> bool:
    return (os.path.exists(os.path.expanduser(model)) or model.startswith(("./", "../", "/", "~"))
            or not HUB_ID_RE.match(model))


def resolve_model(model: str | ModelSource, revision: str | None = None, *, allow_pickle: bool = False,
                  cache_dir: str | None = None, token: str | bool | None = None,
                  trust_remote_code: bool = False) -> ModelSource:
    """Turn MODEL (Hub id or local folder) into a :class:`ModelSource` on local disk. A :class:`ModelSource`
    is already resolved and comes back as it is: the entry point resolves the model once and passes the record
    down (quantisers, verify, eval, bench, tasks), so nothing below it looks the model up again.
    ``trust_remote_code``: the user allows the model's own Python to run (:mod:`quantkit.trust`; given for the
    whole process); without it a model with code is loaded through a code-free view, or refused."""
    if isinstance(model, ModelSource):
        return model
    if trust_remote_code:
        trust.consent()
    if is_local(model):
        if revision:
            raise QuantkitError(f"--revision {revision} was given but {model} is a local folder, not a Hub id")
        return _local_source(Path(os.path.expanduser(model)), allow_pickle=allow_pickle)
    return _pull(model, revision, allow_pickle=allow_pickle, cache_dir=cache_dir, token=token)


# -- local folders ------------------------------------------------------------------------------

def read_json_file(path: Path, what: str, missing: str) -> dict:
    """A JSON file that ``what`` must hold (a config): one-line errors when it is missing (``missing`` says what
    that means) or not valid JSON."""
    if not path.is_file():
        raise QuantkitError(f"{what} has no {path.name}: {missing}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise QuantkitError(f"{path} is not valid JSON ({e})") from None


def _read_config(folder: Path, what: str) -> dict:
    cfg = folder / "config.json"
    config = read_json_file(cfg, what, "it is not a Hugging Face model folder (give a folder made by "
                                       "save_pretrained, or a Hub id like org/name)")
    if not (config.get("architectures") or config.get("model_type")):
        raise QuantkitError(f"{cfg} names no architectures/model_type: cannot tell what model this is")
    return config


def _check_weights(folder: Path, what: str, allow_pickle: bool) -> None:
    names = [p.name for p in folder.iterdir()]
    if any(n.endswith(".safetensors") for n in names):
        return
    if any(fnmatch.fnmatch(n, "pytorch_model*.bin") for n in names):
        if allow_pickle:
            return
        raise QuantkitError(f"{what} has only pickle .bin weights, which can run code when loaded; "
                            "convert them to safetensors, or pass --allow-pickle if you trust the source")
    raise QuantkitError(f"{what} has no *.safetensors weights: nothing to quantise")


def _card_license(folder: Path) -> dict:
    readme = folder / "README.md"
    if not readme.is_file():
        return {}
    try:
        from huggingface_hub.repocard import metadata_load

        meta = metadata_load(readme) or {}
    except Exception:  # a malformed card must not stop a conversion
        return {}
    return {k: meta.get(k) for k in ("license", "license_name", "license_link", "pipeline_tag")
            if meta.get(k) is not None}


def _local_fingerprint(folder: Path) -> str:
    """Cheap identity for a local folder: config + every weight file's name, size and mtime."""
    h = hashlib.sha256((folder / "config.json").read_bytes())
    for p in sorted(folder.iterdir()):
        if p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json"):
            st = p.stat()
            h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return "local-" + h.hexdigest()[:40]


def _local_source(folder: Path, allow_pickle: bool, what: str | None = None) -> ModelSource:
    if not folder.exists():
        raise QuantkitError(f"{folder} does not exist (give a local model folder or a Hub id like org/name)")
    if not folder.is_dir():
        raise QuantkitError(f"{folder} is a file, not a model folder (give the folder holding config.json)")
    config = _read_config(folder, str(folder))
    _check_weights(folder, str(folder), allow_pickle)
    lic = _card_license(folder)
    # A folder we pulled before remembers where it came from.
    origin = {}
    if (folder / ".quantkit-source.json").is_file():
        origin = json.loads((folder / ".quantkit-source.json").read_text())
    folder = folder.resolve()
    load, check = trust.loadable(folder, what)
    return ModelSource(path=load, id=origin.get("id"), revision=origin.get("revision"),
                       sha=origin.get("sha") or _local_fingerprint(folder), config=config, **lic,
                       **_code_fields(folder, load, check))


def _code_fields(folder: Path, load: Path, check: trust.CodeCheck) -> dict:
    return {"code_files": check.files, "trust_remote_code": bool(check.files) and trust.consented(),
            "origin": folder if load != folder else None}


# -- the Hub ------------------------------------------------------------------------------------

# plan.py and evaluate.py import this name; the translation itself is the table in quantkit.errors
_hub_error = hub_error


def _pull(repo_id: str, revision: str | None, *, allow_pickle: bool, cache_dir: str | None,
          token: str | bool | None) -> ModelSource:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub import errors as hf_errors

    api = HfApi(token=token)
    info = None
    try:
        info = api.model_info(repo_id, revision=revision)
    except (hf_errors.GatedRepoError, hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError) as e:
        raise hub_error(e, repo_id, revision) from None
    except Exception as e:  # no network: fall back to what is cached
        if not is_network_error(e):
            raise hub_error(e, repo_id, revision) from None
        log.debug("no answer from the Hub for %s (%s); looking in the local cache", repo_id, type(e).__name__)
        path = None
        # the same file selection as the online pull, or the cache check calls the snapshot incomplete
        for extra in ([SAFETENSORS_PATTERNS] + ([PICKLE_PATTERNS] if allow_pickle else [])):
            try:
                path = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                              allow_patterns=BASE_PATTERNS + extra, local_files_only=True))
                break
            except Exception:
                continue
        if path is None:
            raise hub_error(e, repo_id, revision) from None
        src = _local_source(path, allow_pickle=allow_pickle, what=repo_id)
        src.id, src.revision = repo_id, revision
        src.sha = path.name  # snapshot folders are named by commit SHA
        return src

    files = [s.rfilename for s in (info.siblings or [])]
    patterns = list(BASE_PATTERNS)
    if any(f.endswith(".safetensors") for f in files):
        patterns += SAFETENSORS_PATTERNS
    elif any(fnmatch.fnmatch(f, "pytorch_model*.bin") for f in files):
        if not allow_pickle:
            raise QuantkitError(f"{repo_id} has only pickle .bin weights, which can run code when loaded; "
                                "pass --allow-pickle if you trust the source")
        patterns += PICKLE_PATTERNS
    else:
        raise QuantkitError(f"{repo_id} has no safetensors weights at {info.sha[:12]}: nothing to quantise")
    if "config.json" not in files:
        raise QuantkitError(f"{repo_id} has no config.json: it is not a transformers model")

    try:  # the configs first: a model that needs its own code is refused before any weight is downloaded
        path = Path(snapshot_download(repo_id, revision=info.sha, allow_patterns=BASE_PATTERNS,
                                      cache_dir=cache_dir, token=token))
        check = trust.check_configs(trust.read_configs(path), [f for f in files if f.endswith(".py")])
        if check.needs_code and not trust.consented():
            raise trust.refusal(repo_id, check)
        if trust.consented():  # the code it names comes too (a .py file beside the weights)
            patterns.append("*.py")
        path = Path(snapshot_download(repo_id, revision=info.sha, allow_patterns=patterns,
                                      cache_dir=cache_dir, token=token))
    except QuantkitError:
        raise
    except Exception as e:
        raise hub_error(e, repo_id, revision) from None
    _remember_ref(path, revision or "main", info.sha)
    config = _read_config(path, repo_id)
    load, check = trust.loadable(path, repo_id)
    card = getattr(info, "card_data", None) or getattr(info, "cardData", None) or {}
    get = card.get if hasattr(card, "get") else (lambda k, d=None: getattr(card, k, d))
    return ModelSource(path=load, id=repo_id, revision=revision or "main", sha=info.sha,
                       license=get("license", None), license_name=get("license_name", None),
                       license_link=get("license_link", None),
                       pipeline_tag=getattr(info, "pipeline_tag", None), config=config,
                       **_code_fields(path, load, check))


def _remember_ref(snapshot: Path, revision: str, sha: str) -> None:
    """Map the branch/tag to the commit in the cache (``refs/<revision>``), as huggingface_hub does when it
    resolves a branch itself: we download by SHA, so without this an offline run could not find the snapshot."""
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        return
    try:
        ref = snapshot.parent.parent / "refs" / revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        if not ref.is_file() or ref.read_text().strip() != sha:
            ref.write_text(sha)
    except OSError:  # a read-only cache only costs the offline fallback
        pass


def pull(model: str, revision: str | None = None, *, allow_pickle: bool = False,
         cache_dir: str | None = None, trust_remote_code: bool = False) -> ModelSource:
    """``quantkit pull``: download (or check) a model and return where it is."""
    return resolve_model(model, revision, allow_pickle=allow_pickle, cache_dir=cache_dir,
                         trust_remote_code=trust_remote_code)
