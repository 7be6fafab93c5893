"""``quantkit.json``: the one record every stage reads and extends.

One output folder (a GGUF set, or one AWQ/GPTQ variant) = one manifest = one Hub repo when pushed.

Schema (``schema: 1``)::

    {
      "schema": 1,
      "quantkit_version": "0.1.0",
      "base": {"id", "revision", "sha", "license", "license_name", "license_link", "model_name",
               "architecture", "local_path", "pipeline_tag"},
      "artifacts": {                     # keyed by artifact name
        "<name>": {
          "path": "Model-Q4_K_M.gguf" | ".",   # file or folder, relative to the manifest's folder
          "format": "gguf" | "awq" | "gptq" | "compressed-tensors",
          "method": "gguf" | "awq" | "gptq",
          "type": "Q4_K_M" | "INT4" ...,
          "bits": 4, "bits_per_weight": 4.89, "group_size": 128,
          "files": [{"path", "size", "sha256"}],
          "size": total bytes,
          "params": {...exact parameters...},
          "calibration": {...} | null,
          "tools": {dist: version},
          "seconds": float, "created": iso8601,
          "eval": {...} | absent,      # written by evaluate.py
          "bench": {...} | absent      # written by bench.py
        }
      },
      "intermediates": {...},          # e.g. the F16 GGUF and imatrix; not artifacts, not pushed
      "evaluation": {...},             # shared eval context (text, sha256, ctx, base ppl, hardware)
      "pushes": [{"repo", "revision", "commit", "url", "private", "time"}],
      "history": [{"stage", "time", ...}]
    }
The token is never written here.

Several processes may share one folder (two ``quantkit gguf`` runs with different types, eval while a type is
being added, parallel CI jobs): :meth:`Manifest.save` writes under an OS lock on ``.quantkit.json.lock`` and
merges with what is on disk, so every process keeps the records it did not touch (see
:func:`quantkit.util.merge_json_into`); :meth:`Manifest.update` holds the lock for a whole read-modify-write.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from pathlib import Path
from typing import Any, Iterator

from quantkit import __version__
from quantkit.errors import QuantkitError
from quantkit.util import file_lock, lock_file_for, now_iso, save_json_merged, sha256_file

MANIFEST_NAME = "quantkit.json"
SCHEMA = 1
_PARTS = {"base": {}, "artifacts": {}, "intermediates": {}, "evaluation": {}, "pushes": [], "history": []}


class Manifest:
    def __init__(self, folder: str | os.PathLike, data: dict | None = None):
        self.folder = Path(folder)
        self.data: dict[str, Any] = data or {"schema": SCHEMA, "quantkit_version": __version__,
                                             **copy.deepcopy(_PARTS)}
        self._base = copy.deepcopy(self.data)  # what was on disk when read: save() merges against it
        self._locked = False

    # -- io -------------------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        return self.folder / MANIFEST_NAME

    @classmethod
    def load(cls, folder: str | os.PathLike, create: bool = True) -> "Manifest":
        folder = Path(folder)
        p = folder / MANIFEST_NAME
        if not p.exists():
            if not create:
                raise QuantkitError(f"{folder} has no {MANIFEST_NAME}: it is not a quantkit output folder "
                                    f"(run `quantkit gguf|awq|gptq ... --out {folder}` first)")
            return cls(folder)
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise QuantkitError(f"{p} is not valid JSON ({e}); remove it to start that folder afresh") from None
        if data.get("schema") != SCHEMA:
            raise QuantkitError(f"{p} has schema {data.get('schema')!r}; this quantkit reads schema {SCHEMA}")
        for key, default in _PARTS.items():
            data.setdefault(key, copy.deepcopy(default))
        return cls(folder, data)

    @classmethod
    def exists(cls, folder: str | os.PathLike) -> bool:
        return (Path(folder) / MANIFEST_NAME).exists()

    @property
    def lock_path(self) -> Path:
        return lock_file_for(self.path)

    def save(self) -> None:
        """Write under the folder's lock, merged with what other processes wrote since this one read it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.data["quantkit_version"] = __version__
        self._base = save_json_merged(self.path, self.data, self._base, locked=self._locked, defaults=_PARTS)

    def refresh(self) -> None:
        """Take in what other processes wrote since this one read the file (unsaved changes stay pending)."""
        if self.path.exists():
            self._base = save_json_merged(self.path, self.data, self._base, write=False, locked=self._locked,
                                          defaults=_PARTS)

    @classmethod
    @contextlib.contextmanager
    def update(cls, folder: str | os.PathLike, create: bool = False) -> Iterator["Manifest"]:
        """Lock the folder's manifest, read it, let the block change it, write it (atomically), unlock.

        Other processes' saves wait meanwhile, so nothing they write is lost; nothing is written when the block
        raises."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True) if create else None
        with file_lock(lock_file_for(folder / MANIFEST_NAME)):
            m = cls.load(folder, create=create)
            m._locked = True
            yield m
            m.save()
            m._locked = False

    # -- accessors ------------------------------------------------------------------------------
    @property
    def base(self) -> dict:
        return self.data["base"]

    @property
    def artifacts(self) -> dict[str, dict]:
        return self.data["artifacts"]

    def set_base(self, **fields) -> None:
        old_sha = self.base.get("sha")
        new_sha = fields.get("sha")
        if old_sha and new_sha and old_sha != new_sha:
            raise QuantkitError(
                f"{self.folder} holds artifacts of {self.base.get('id') or self.base.get('local_path')} at "
                f"{old_sha[:12]}, not {new_sha[:12]}: use another --out folder or delete it")
        self.base.update({k: v for k, v in fields.items() if v is not None})

    def artifact(self, name: str) -> dict | None:
        return self.artifacts.get(name)

    def set_artifact(self, name: str, record: dict) -> dict:
        """Add or replace an artifact's whole record (a rebuilt artifact drops what was measured on the old one,
        also when another process saved meanwhile)."""
        record.setdefault("created", now_iso())
        self.artifacts[name] = record
        self._base.get("artifacts", {}).pop(name, None)
        return record

    def update_artifact(self, name: str, **fields) -> dict:
        if name not in self.artifacts:
            raise KeyError(name)
        self.artifacts[name].update(fields)
        return self.artifacts[name]

    def log(self, stage: str, **fields) -> None:
        self.data["history"].append({"stage": stage, "time": now_iso(), **fields})

    # -- verification ---------------------------------------------------------------------------
    def artifact_is_intact(self, name: str) -> bool:
        """True when every file the artifact recorded is present with its recorded size and sha256."""
        rec = self.artifacts.get(name)
        if not rec or not rec.get("files"):
            return False
        for f in rec["files"]:
            p = self.folder / f["path"]
            if not p.is_file() or p.stat().st_size != f["size"]:
                return False
            if sha256_file(p) != f["sha256"]:
                return False
        return True


def file_record(folder: Path, path: Path, sha256: str | None = None) -> dict:
    """``{"path", "size", "sha256"}`` for a file inside ``folder``."""
    path = Path(path)
    return {
        "path": path.relative_to(folder).as_posix(),
        "size": path.stat().st_size,
        "sha256": sha256 or sha256_file(path),
    }
