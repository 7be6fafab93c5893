"""Consent for a model's own code: no Python file shipped with a model runs without ``--trust-remote-code``.

A model folder (or Hub repo) can carry Python: ``config.json`` / ``tokenizer_config.json`` name modules in
``auto_map`` (``modeling_x.XForCausalLM``, or ``org/repo--modeling_x.X`` in another repo), and ``*.py`` files sit
beside the weights. transformers imports them only when told ``trust_remote_code=True``, but not every engine
asks: GPTQModel 7.6 (``gptqmodel/utils/hf.py``, ``prepare_remote_model_init_compat``) imports ``auto_map``'s
modules whatever ``trust_remote_code`` says, and llama.cpp's converter passes ``trust_remote_code=True`` for some
tokenizers. So the decision is taken here, once, where the source record is made, and no engine is asked:

* **no code** in the folder: it is used as it is;
* **code, no consent, an architecture transformers knows** (``model_type`` in its table; a tokenizer class it
  has): every engine gets a *code-free view* of the folder (:func:`code_free_view`: the files linked, the
  ``*.py`` left out, ``auto_map`` taken out of the configs), so there is nothing any of them could import;
* **code, no consent, an architecture only its code defines**: refused in one line naming the flag and the files
  that would run (from the Hub: before any weight is downloaded);
* **consent** (``--trust-remote-code``, recipe ``trust_remote_code: true``): the folder as it is, and the engines
  are told so (:func:`hf_kwargs`, vLLM's flag); the manifest and the card say the model's code ran.

As a second line, :func:`guard` makes transformers' loader of dynamic modules refuse in this process unless
consent was given, whoever calls it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from quantkit.errors import QuantkitError

FLAG = "--trust-remote-code"
CONFIGS = ("config.json", "tokenizer_config.json")  # the files whose ``auto_map`` names code

_consent = False


def consent(given: bool = True) -> None:
    """Record, for this process, that the user allowed models' own code (``--trust-remote-code``)."""
    global _consent
    _consent = bool(given)


def consented() -> bool:
    return _consent


def hf_kwargs() -> dict:
    """What to pass to ``from_pretrained`` (transformers, GPTQModel): ``trust_remote_code=True`` with consent."""
    return {"trust_remote_code": True} if _consent else {}


# -- what a folder holds --------------------------------------------------------------------------------------

def _auto_map_files(auto_map) -> list[str]:
    """``auto_map`` values -> the module files they import (``modeling_x.py``; ``org/repo:modeling_x.py``)."""
    refs = []
    for v in (auto_map or {}).values():
        refs += v if isinstance(v, (list, tuple)) else [v]
    out = []
    for ref in refs:
        if not isinstance(ref, str) or "." not in ref:
            continue
        repo, _, mod = ref.rpartition("--")
        out.append(f"{repo}:" * bool(repo) + mod.rsplit(".", 1)[0] + ".py")
    return out


@dataclass
class CodeCheck:
    """What a model's files say about code: the files that would run, and whether it loads without them."""

    files: list[str] = field(default_factory=list)
    needs_code: bool = False
    why: str = ""


def check_configs(configs: dict[str, dict], py_files: list[str]) -> CodeCheck:
    """``configs``: the parsed :data:`CONFIGS` that exist; ``py_files``: the ``*.py`` names in the folder/repo."""
    files = set(py_files)
    for cfg in configs.values():
        files.update(_auto_map_files(cfg.get("auto_map")))
    check = CodeCheck(sorted(files))
    if not check.files:
        return check
    config = configs.get("config.json") or {}
    model_type = config.get("model_type")
    if model_type and not _native_model_type(model_type):
        check.needs_code, check.why = True, f"its model_type {model_type!r} is not one transformers knows"
    elif not model_type and (config.get("auto_map") or {}):
        check.needs_code, check.why = True, "its config names no model_type, only code"
    tok = configs.get("tokenizer_config.json") or {}
    cls = tok.get("tokenizer_class")
    if not check.needs_code and tok.get("auto_map") and cls and not _native_tokenizer(cls):
        check.needs_code, check.why = True, f"its tokenizer class {cls!r} is defined by that code"
    return check


def _native_model_type(model_type: str) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return model_type in CONFIG_MAPPING_NAMES


def _native_tokenizer(cls: str) -> bool:
    import transformers

    return any(hasattr(transformers, c) for c in {cls, cls.removesuffix("Fast")})


def read_configs(folder: Path) -> dict[str, dict]:
    out = {}
    for name in CONFIGS:
        try:
            out[name] = json.loads((folder / name).read_text())
        except (OSError, json.JSONDecodeError):
            continue  # missing, or broken: the loaders say so in their own words
    return out


def refusal(what: str, check: CodeCheck) -> QuantkitError:
    return QuantkitError(f"{what} needs its own Python code to load ({check.why}), which would run "
                         f"{', '.join(check.files)}: pass {FLAG} (recipe: trust_remote_code: true) if you trust "
                         "that code; no weight was downloaded and no code was run")


# -- the code-free view ---------------------------------------------------------------------------------------

def code_free_view(folder: Path) -> Path:
    """A folder in quantkit's cache that shows ``folder`` without its code: every file but ``*.py`` linked, the
    configs rewritten without ``auto_map`` (and without ``custom_pipelines``). Keyed by the folder and its
    configs, built beside its final name and renamed into place (a crash leaves no half view)."""
    from quantkit.util import cache_home

    folder = folder.resolve()
    h = hashlib.sha256(str(folder).encode())
    for name in CONFIGS:
        p = folder / name
        h.update(p.read_bytes() if p.is_file() else b"-")
    root = cache_home() / "code-free"
    final = root / f"{folder.name}-{h.hexdigest()[:16]}"
    entries = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix != ".py")
    if final.is_dir() and {p.name for p in final.iterdir()} == {p.name for p in entries}:
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        for p in entries:
            if p.name in CONFIGS:
                cfg = json.loads(p.read_text())
                for key in ("auto_map", "custom_pipelines"):
                    cfg.pop(key, None)
                (tmp / p.name).write_text(json.dumps(cfg, indent=2) + "\n")
            else:
                os.symlink(p, tmp / p.name)
        shutil.rmtree(final, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:  # another process put the same view there meanwhile
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def loadable(folder: Path, what: str | None = None) -> tuple[Path, CodeCheck]:
    """The folder the engines may load for ``folder`` (itself, or its code-free view), and what was found;
    refuses a folder that cannot load without its code when no consent was given."""
    py = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix == ".py")
    check = check_configs(read_configs(folder), py)
    if not check.files:
        return folder, check
    guard()
    if _consent:
        return folder, check
    if check.needs_code:
        raise refusal(what or str(folder), check)
    return code_free_view(folder), check


# -- the second line: transformers' dynamic-module loader ------------------------------------------------------

def guard() -> None:
    """Make transformers refuse, in this process, to fetch or import a model's module unless consent was given
    (whoever asks: an engine that ignores ``trust_remote_code`` included). Idempotent."""
    from transformers import dynamic_module_utils as dmu

    if getattr(dmu.get_cached_module_file, "_quantkit_guard", False):
        return
    original = dmu.get_cached_module_file

    def guarded(pretrained_model_name_or_path, module_file, *args, **kwargs):
        if not _consent:
            raise QuantkitError(f"{pretrained_model_name_or_path} asked to run its own code ({module_file}) and "
                                f"{FLAG} was not given: refused")
        return original(pretrained_model_name_or_path, module_file, *args, **kwargs)

    guarded._quantkit_guard = True
    dmu.get_cached_module_file = guarded
