"""LoRA fine-tunes: merge-then-quantise, or the adapter beside a quantised base.

* :func:`load_adapter` resolves a PEFT adapter (local folder or Hub id, revision pinned to a commit SHA like a
  base in :mod:`quantkit.hub`) and checks it is a LoRA adapter with ``adapter_config.json`` and safetensors
  weights. :func:`check_fits` compares every adapted module's LoRA shapes with the base's weight shapes (read
  from the safetensors headers, nothing loaded), so an adapter for another architecture or size stops with one
  line before any heavy work.
* :func:`merge` merges the adapter into the base at full precision (fp32) with PEFT's own ``merge_and_unload``
  and saves the result, in the base's dtype, as an HF folder cached under ``<quantkit cache>/merged/`` keyed by
  base SHA + adapter SHA. :func:`resolve_source` is what ``quantkit gguf|awq|gptq --adapter`` and recipes'
  ``adapter:`` use: the merged folder as a :class:`MergedSource` whose manifest base records base and adapter.
* :func:`convert_adapter` (``quantkit lora``) turns the PEFT adapter into a GGUF LoRA adapter with llama.cpp's
  own ``convert_lora_to_gguf.py`` (same llama.cpp commit as the library, see :mod:`quantkit.llamacpp`), for
  ``llama_cpp.Llama(lora_path=...)`` / ``llama-cli --lora``. AWQ/GPTQ bases take the PEFT adapter as it is.
* ``MODEL+ADAPTER`` (:func:`split_spec`) is the syntax ``quantkit eval`` reads for "with this adapter applied".
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from quantkit import trust
from quantkit.demo import _publish_dir
from quantkit.errors import QuantkitError
from quantkit.hub import ModelSource
from quantkit.util import cache_home, safetensors_tensors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PATTERNS = [ADAPTER_CONFIG, ADAPTER_WEIGHTS, "README.md", "LICENSE*", "LICENCE*", "license*", "NOTICE*"]
LORA_OUTTYPES = ("f32", "f16", "bf16", "q8_0")  # convert_lora_to_gguf.py's --outtype choices (less auto)
# What travels from the base into a merged folder besides the weights and config save_pretrained writes.
_BASE_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
               "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json", "chat_template.jinja",
               "chat_template.json", "generation_config.json", "LICENSE", "USE_POLICY.md")
MERGE_RECORD = "quantkit-merge.json"


# -- the adapter --------------------------------------------------------------------------------

@dataclass
class AdapterSource:
    """A PEFT adapter resolved to a local folder and a fixed revision."""

    path: Path
    id: str | None = None
    revision: str | None = None
    sha: str = ""
    config: dict = field(default_factory=dict)
    license: str | None = None
    license_name: str | None = None
    license_link: str | None = None

    @property
    def name(self) -> str:
        return (self.id or str(self.path.resolve())).rstrip("/").split("/")[-1]

    @property
    def rank(self) -> int | None:
        return self.config.get("r")

    def record(self) -> dict:
        """What manifests and cards keep about the adapter."""
        c = self.config
        tm = c.get("target_modules")
        return {"id": self.id, "revision": self.revision, "sha": self.sha, "name": self.name,
                "peft_type": c.get("peft_type"), "rank": c.get("r"), "alpha": c.get("lora_alpha"),
                "target_modules": sorted(tm) if isinstance(tm, list) else tm,
                "base_model_name_or_path": c.get("base_model_name_or_path"),
                "license": self.license, "license_name": self.license_name, "license_link": self.license_link,
                "local_path": str(self.path)}


def _license(folder: Path) -> dict:
    from quantkit.hub import _card_license

    return {k: v for k, v in _card_license(folder).items() if k.startswith("license")}


def _content_sha(folder: Path) -> str:
    h = hashlib.sha256()
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        h.update(name.encode() + b"\0" + (folder / name).read_bytes() + b"\0")
    return "local-" + h.hexdigest()[:40]


def _check_adapter_folder(folder: Path, what: str) -> dict:
    from quantkit.hub import read_json_file

    cfg = folder / ADAPTER_CONFIG
    config = read_json_file(cfg, what, "it is not a PEFT adapter folder (give a folder written by "
                                       "PeftModel.save_pretrained, or a Hub id)")
    kind = str(config.get("peft_type") or "").upper()
    if kind != "LORA":
        raise QuantkitError(f"{what} is a {config.get('peft_type') or 'untyped'} adapter: quantkit merges and "
                            "converts LoRA adapters only (peft_type LORA)")
    if config.get("use_dora"):
        raise QuantkitError(f"{what} is a DoRA adapter (use_dora): llama.cpp's LoRA format cannot hold its "
                            "magnitude vectors; only plain LoRA is supported")
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise QuantkitError(f"{what} has no {ADAPTER_WEIGHTS} (pickle adapter_model.bin is not read: save the "
                            "adapter with safe_serialization)")
    return config


def load_adapter(spec: str, revision: str | None = None, *, token=None) -> AdapterSource:
    """Turn ADAPTER (local folder or Hub id) into an :class:`AdapterSource`; one-line errors before any work."""
    from quantkit.hub import is_local

    if is_local(spec):
        if revision:
            raise QuantkitError(f"--adapter-revision {revision} was given but {spec} is a local folder")
        folder = Path(os.path.expanduser(spec))
        if not folder.is_dir():
            raise QuantkitError(f"adapter {spec} does not exist (give a PEFT adapter folder or a Hub id org/name)")
        config = _check_adapter_folder(folder, f"adapter {spec}")
        return AdapterSource(path=folder.resolve(), sha=_content_sha(folder), config=config,
                             **_license(folder))
    return _pull_adapter(spec, revision, token=token)


def _pull_adapter(repo_id: str, revision: str | None, *, token=None) -> AdapterSource:
    from huggingface_hub import HfApi, snapshot_download

    from quantkit.hub import _hub_error

    try:
        info = HfApi(token=token).model_info(repo_id, revision=revision)
        files = [s.rfilename for s in (info.siblings or [])]
        if ADAPTER_CONFIG not in files:
            raise QuantkitError(f"adapter {repo_id} has no {ADAPTER_CONFIG} at {info.sha[:12]}: it is not a "
                                "PEFT adapter repo")
        path = Path(snapshot_download(repo_id, revision=info.sha, allow_patterns=ADAPTER_PATTERNS, token=token))
    except QuantkitError:
        raise
    except Exception as e:
        raise _hub_error(e, repo_id, revision) from None
    config = _check_adapter_folder(path, f"adapter {repo_id}")
    return AdapterSource(path=path, id=repo_id, revision=revision or "main", sha=info.sha, config=config,
                         **_license(path))


def check_fits(adapter: AdapterSource, base: ModelSource) -> None:
    """Every adapted module must exist in the base with the shapes the LoRA matrices imply."""
    ad = {name: tuple(shape) for name, _, shape, _ in safetensors_tensors(adapter.path)}
    bs = {name: tuple(shape) for name, _, shape, _ in safetensors_tensors(base.path)}
    what = f"adapter {adapter.name} does not fit base {base.name}"
    pairs: dict[str, dict] = {}
    for k, shape in ad.items():
        for tag in ("lora_A", "lora_B"):
            if f".{tag}." in k:
                mod = k.split(f".{tag}.")[0]
                mod = mod[len("base_model.model."):] if mod.startswith("base_model.model.") else mod
                pairs.setdefault(mod, {})[tag] = shape
    if not pairs:
        raise QuantkitError(f"adapter {adapter.name} holds no lora_A/lora_B weights: nothing to apply")
    for mod, ab in sorted(pairs.items()):
        w = bs.get(mod + ".weight")
        if w is None:
            raise QuantkitError(f"{what}: it adapts {mod}, which the base does not have (an adapter for "
                                f"another architecture{' or depth' if '.layers.' in mod else ''}?)")
        a, b = ab.get("lora_A"), ab.get("lora_B")
        if a is None or b is None or len(w) != 2:
            continue
        if (b[0], a[1]) != tuple(w):
            raise QuantkitError(f"{what}: {mod} is {w[0]}x{w[1]} in the base but the adapter's LoRA is for "
                                f"{b[0]}x{a[1]} (different hidden sizes: an adapter for another model size?)")


def split_spec(spec: str) -> tuple[str, str | None]:
    """``MODEL+ADAPTER`` -> (MODEL, ADAPTER); a spec that exists as a path is never split."""
    if os.path.exists(os.path.expanduser(spec)) or "+" not in spec:
        return spec, None
    model, adapter = spec.rsplit("+", 1)
    if not model or not adapter:
        raise QuantkitError(f"{spec!r}: write MODEL+ADAPTER (e.g. ./Q4_K_M.gguf+./my-lora)")
    return model, adapter


# -- merge then quantise ------------------------------------------------------------------------

@dataclass
class MergedSource(ModelSource):
    """The merged fine-tune, standing in for the base: its manifest base records base and adapter."""

    base: ModelSource | None = None
    adapter: AdapterSource | None = None

    @property
    def name(self) -> str:
        return self.adapter.name if self.adapter else super().name

    def manifest_base(self) -> dict:
        d = super().manifest_base()
        merged_from = {k: v for k, v in self.base.manifest_base().items() if k != "local_path"}
        merged_from["local_path"] = str(self.base.path)
        d.update(model_name=self.name, adapter=self.adapter.record(), merged_from=merged_from)
        return d


def stricter_license(base: ModelSource, adapter: AdapterSource) -> dict:
    from quantkit.licenses import stricter_license as _stricter

    keys = ("license", "license_name", "license_link")
    return _stricter({k: getattr(base, k) for k in keys}, {k: getattr(adapter, k) for k in keys})


def merged_sha(base: ModelSource, adapter: AdapterSource) -> str:
    return "merged-" + hashlib.sha256(f"{base.sha}\0{adapter.sha}".encode()).hexdigest()[:40]


def merged_dir(base: ModelSource, adapter: AdapterSource) -> Path:
    key = hashlib.sha256(f"{base.sha}\0{adapter.sha}".encode()).hexdigest()[:16]
    return cache_home() / "merged" / f"{base.name}+{adapter.name}-{key}"


def merge(base: ModelSource, adapter: AdapterSource) -> Path:
    """Merge ``adapter`` into ``base`` (fp32, PEFT's merge_and_unload) once; return the cached HF folder."""
    folder = merged_dir(base, adapter)
    if (folder / MERGE_RECORD).is_file():
        return folder
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from quantkit.util import dist_version

    print(f"merging {adapter.name} into {base.name} (fp32, PEFT merge_and_unload)...", file=sys.stderr, flush=True)
    dtype = base.config.get("dtype") or base.config.get("torch_dtype") or "float32"
    save_dtype = getattr(torch, str(dtype).replace("torch.", ""), torch.float32)
    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32, **trust.hf_kwargs())
    model = PeftModel.from_pretrained(model, adapter.path).merge_and_unload()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.to(save_dtype).save_pretrained(tmp, safe_serialization=True)
        for name in _BASE_FILES:
            if (base.path / name).is_file():
                shutil.copy(base.path / name, tmp / name)
        record = {"base": {k: v for k, v in base.manifest_base().items()}, "adapter": adapter.record(),
                  "dtype": str(save_dtype).replace("torch.", ""), "merge": "peft merge_and_unload (fp32)",
                  "peft": dist_version("peft"), "transformers": dist_version("transformers")}
        (tmp / MERGE_RECORD).write_text(json.dumps(record, indent=2))
        # resolve_model(<this folder>) keeps the merged identity (eval, plan and bench get the folder)
        (tmp / ".quantkit-source.json").write_text(json.dumps({"sha": merged_sha(base, adapter)}))
        if folder.exists() and not (folder / MERGE_RECORD).is_file():  # a merge interrupted before its record
            shutil.rmtree(folder)
        return _publish_dir(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def resolve_source(model: str | ModelSource, revision: str | None = None, *, adapter: str | None = None,
                   adapter_revision: str | None = None, allow_pickle: bool = False) -> ModelSource:
    """MODEL (or ``MODEL+ADAPTER``), merged with ``adapter`` when one is given; plain resolve_model otherwise.
    A resolved record (:class:`ModelSource`, a merged fine-tune's :class:`MergedSource` too) comes back as it
    is."""
    from quantkit.hub import resolve_model

    if isinstance(model, ModelSource):
        if adapter is not None:
            raise QuantkitError(f"{model.name} is already resolved: give its adapter when resolving it")
        return model
    if adapter is None:
        model, adapter = split_spec(model)
    if adapter is None:
        return resolve_model(model, revision, allow_pickle=allow_pickle)
    ad = load_adapter(adapter, adapter_revision)
    base = resolve_model(model, revision, allow_pickle=allow_pickle)
    check_fits(ad, base)
    folder = merge(base, ad)
    from quantkit.hub import _read_config

    return MergedSource(path=folder, id=ad.id, revision=ad.revision, sha=merged_sha(base, ad),
                        pipeline_tag=base.pipeline_tag,
                        config=_read_config(folder, str(folder)), base=base, adapter=ad,
                        **stricter_license(base, ad))


# -- the adapter beside a quantised base ---------------------------------------------------------

def _run_lora_converter(adapter: AdapterSource, base: ModelSource, dest: Path, outtype: str, log: Path) -> None:
    from quantkit import llamacpp

    src = llamacpp.ensure_sources()
    script = src / "convert_lora_to_gguf.py"
    if not script.is_file():
        raise QuantkitError(f"{src} has no convert_lora_to_gguf.py: run `quantkit setup` again")
    cmd = [sys.executable, str(script), "--outfile", str(dest), "--outtype", outtype, "--base", str(base.path),
           str(adapter.path)]
    with open(log, "w") as f:
        r = subprocess.run(cmd, env=llamacpp.converter_env(), stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0 or not dest.is_file():
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        err = next((ln for ln in reversed(lines) if "ERROR" in ln or "Error" in ln), lines[-1] if lines else "")
        raise QuantkitError(f"llama.cpp's convert_lora_to_gguf.py failed on {adapter.name}: {err[:300]} "
                            f"(log: {log})")


def gguf_adapter_name(adapter: AdapterSource, outtype: str) -> str:
    return f"{adapter.name}-LoRA-{outtype.upper()}.gguf"


def cached_gguf_adapter(adapter: AdapterSource, base: ModelSource, outtype: str = "f32") -> Path:
    """The adapter as a GGUF LoRA, converted once into the quantkit cache (``quantkit eval`` uses this)."""
    key = hashlib.sha256(f"{adapter.sha}\0{base.sha}\0{outtype}".encode()).hexdigest()[:16]
    folder = cache_home() / "lora-gguf" / key
    dest = folder / gguf_adapter_name(adapter, outtype)
    if dest.is_file():
        return dest
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{dest.name}.partial"
    _run_lora_converter(adapter, base, tmp, outtype, folder / "convert.log")
    os.replace(tmp, dest)
    return dest


@dataclass
class LoraResult:
    folder: Path
    path: Path
    adapter: dict
    base: dict
    converted: bool

    def to_json(self) -> dict:
        return {"folder": str(self.folder), "path": str(self.path), "adapter": self.adapter, "base": self.base,
                "converted": self.converted}


def convert_adapter(adapter: str, base: str, out: str | os.PathLike | None = None, *, outtype: str = "f16",
                    revision: str | None = None, adapter_revision: str | None = None) -> LoraResult:
    """``quantkit lora``: the PEFT adapter as a GGUF LoRA adapter in an output folder with its quantkit.json."""
    from quantkit.hub import resolve_model
    from quantkit.manifest import Manifest, file_record
    from quantkit.util import dist_version

    outtype = outtype.lower()
    if outtype not in LORA_OUTTYPES:
        raise QuantkitError(f"--outtype {outtype!r} is not one of {', '.join(LORA_OUTTYPES)}")
    ad = load_adapter(adapter, adapter_revision)
    src = resolve_model(base, revision)
    check_fits(ad, src)
    from quantkit.ggufio import check_architecture

    check_architecture(src.config)
    folder = Path(out).expanduser() if out else Path.cwd() / f"{ad.name}-LoRA-GGUF"
    folder.mkdir(parents=True, exist_ok=True)
    folder = folder.resolve()
    name = gguf_adapter_name(ad, outtype)
    dest = folder / name
    m = Manifest.load(folder)
    base_rec = src.manifest_base()
    base_rec.update(adapter=ad.record(), base_license=src.license, **stricter_license(src, ad))
    m.set_base(**base_rec)
    rec = m.artifact(name)
    if rec and dest.is_file() and m.artifact_is_intact(name) and rec.get("adapter_sha") == ad.sha:
        return LoraResult(folder, dest, ad.record(), base_rec, False)
    tmp = folder / f".{name}.partial"
    _run_lora_converter(ad, src, tmp, outtype, folder / f".{name}.convert.log")
    os.replace(tmp, dest)
    m.set_artifact(name, {"format": "gguf-lora", "type": outtype.upper(), "adapter_sha": ad.sha,
                          "files": [file_record(folder, dest)],
                          "tools": {"llama-cpp-python": dist_version("llama-cpp-python"), "peft": dist_version("peft")},
                          "converter": "llama.cpp convert_lora_to_gguf.py"})
    m.log("lora", adapter=ad.id or str(ad.path), adapter_sha=ad.sha, outtype=outtype)
    m.save()
    return LoraResult(folder, dest, ad.record(), base_rec, True)
