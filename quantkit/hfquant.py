"""Shared machinery of ``quantkit awq`` and ``quantkit gptq``: one calibrated, weight-only quantised variant of a
Hugging Face model in one output folder.

Two engines, chosen by ``--format``:

* ``classic`` (default): GPTQModel writes the ``quant_method: awq|gptq`` layout that vLLM, TGI, SGLang,
  transformers (with gptqmodel) and ExLlama read.
* ``compressed-tensors``: llm-compressor's ``oneshot`` (GPTQModifier / AWQModifier) writes vLLM's native
  ``quant_method: compressed-tensors`` (``pack-quantized``), which transformers also loads with the
  ``compressed-tensors`` package alone.

Each run builds the folder under a temporary sibling name (``.<name>.<random>.partial``) and renames it onto
the final name only when weights, config, tokenizer, ``quantkit-recipe.json`` and ``quantkit.json`` are all
written; a re-run finds a complete, intact folder with the same parameters and returns it untouched.

Engine quirks handled here (measured with gptqmodel 7.6.0 / llmcompressor 0.14 on CPU-only torch):

* gptqmodel sizes its CPU worker pool to ``(cores+1)//2``, which stalls on a 2-core box: we default
  ``GPTQMODEL_CPU_WORKERS`` to at least 2 (an explicit value in the environment wins).
* gptqmodel compiles C++ kernels into ``~/.cache``: ``GPTQMODEL_TORCH_EXTENSIONS_DIR`` defaults to
  ``<quantkit cache>/torch_extensions``.
* gptqmodel writes its per-layer logs into ``./logs/`` of the current directory: redirected (only while it
  runs) to ``<quantkit cache>/logs/gptqmodel``.
* gptqmodel records a random temporary path (``meta.offload_to_disk_path``) in ``config.json`` and
  ``quantize_config.json``: removed, so two runs with the same inputs write the same configs; its disk
  offload goes into the work folder instead of ``/tmp`` (so the disk check covers it) and is deleted there.
* gptqmodel AWQ on a machine without an accelerator needs ``backend=BACKEND.AWQ_TORCH``.
* llm-compressor's AWQ pins its cached activations with ``Tensor.pin_memory()``, which raises
  "Cannot access accelerator device" on CPU-only torch. Pinning only speeds host-to-device copies, so while
  ``oneshot`` runs on a machine where ``torch.accelerator.is_available()`` is false, quantkit replaces
  ``IntermediatesCache.pin_memory`` with a no-op and restores it afterwards (a scoped patch, no fork).
* Engines print to stdout; while they run, stdout goes to stderr so ``--json`` output stays parseable.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from quantkit.errors import QuantkitError
from quantkit.util import Timer, cache_home, format_table, human_size, now_iso, safetensors_tensors, versions

FORMATS = ("classic", "compressed-tensors")
DEFAULT_FORMAT = "classic"
RECIPE_NAME = "quantkit-recipe.json"
ENGINE_DISTS = {
    "classic": ("gptqmodel", "transformers", "torch", "optimum"),
    "compressed-tensors": ("llmcompressor", "compressed-tensors", "transformers", "torch"),
}
LICENSE_GLOBS = ("LICENSE*", "LICENCE*", "license*", "NOTICE*", "USE_POLICY.md")
TABLE_HEADERS = ["variant", "format", "bits", "group", "size", "calib tokens", "seconds", "status"]
_GB = 1e9


@dataclass
class QuantResult:
    """What ``quantize_awq`` / ``quantize_gptq`` return."""

    folder: Path
    name: str
    manifest: "object"  # quantkit.manifest.Manifest
    cached: bool = False
    messages: list[str] = field(default_factory=list)

    @property
    def artifact(self) -> dict:
        return self.manifest.artifact(self.name)

    def table_rows(self) -> list[list]:
        a = self.artifact
        cal = a.get("calibration") or {}
        return [[self.name, a["format"], a["bits"], a["group_size"], human_size(a["size"]),
                 cal.get("token_count"), f"{a['seconds']:.1f}", "cached" if self.cached else "built"]]

    def table(self) -> str:
        return format_table(self.table_rows(), TABLE_HEADERS)

    def to_json(self) -> dict:
        return {"name": self.name, "folder": str(self.folder), "cached": self.cached,
                "artifact": self.artifact, "base": self.manifest.base}


# -- names and parameters -----------------------------------------------------------------------

def variant_name(model_name: str, method: str, fmt: str, bits: int, group_size: int, sym: bool = True) -> str:
    """``SmolLM2-135M-AWQ-INT4-g128`` (classic) / ``SmolLM2-135M-GPTQ-W8A16-g128`` (compressed-tensors)."""
    kind = f"INT{bits}" if fmt == "classic" else f"W{bits}A16"
    group = "ch" if group_size == -1 else f"g{group_size}"
    asym = "-asym" if (method == "gptq" and not sym) else ""
    return f"{model_name}-{method.upper()}-{kind}-{group}{asym}"


ALLOWED_BITS = {"awq": (4,), "gptq": (4, 8)}


def check_params(method: str, *, bits: int, group_size: int, fmt: str, samples: int, seq_len: int,
                 damp: float | None = None) -> None:
    if fmt not in FORMATS:
        raise QuantkitError(f"--format must be one of {', '.join(FORMATS)} (got {fmt!r})")
    allowed_bits = ALLOWED_BITS[method]
    if bits not in allowed_bits:
        raise QuantkitError(f"{method.upper()} supports --bits {' or '.join(map(str, allowed_bits))} "
                            f"(got {bits})")
    if group_size != -1 and (group_size < 16 or group_size & (group_size - 1)):
        raise QuantkitError(f"--group-size must be a power of two >= 16, or -1 for one scale per channel "
                            f"(got {group_size})")
    if samples < 1:
        raise QuantkitError(f"--samples must be at least 1 (got {samples})")
    if seq_len < 16:
        raise QuantkitError(f"--seq-len must be at least 16 (got {seq_len})")
    if damp is not None and not (0 < damp < 1):
        raise QuantkitError(f"--damp must be between 0 and 1, e.g. 0.01 (got {damp})")


# -- sizes and resources ------------------------------------------------------------------------

def weight_stats(folder: Path) -> dict:
    """Sizes from the safetensors headers (no weights read): bytes on disk, parameter counts, and how many
    of them sit in 2-D ``layers`` matrices (what AWQ/GPTQ quantise; embeddings, norms, lm_head stay 16-bit)."""
    files = sorted(folder.glob("*.safetensors"))
    stats = {"bytes": 0, "params": 0, "quantisable_params": 0, "largest_matrix_bytes": 0, "in_features": {}}
    if not files:  # pickle weights (--allow-pickle): sizes only
        b = sum(p.stat().st_size for p in folder.glob("pytorch_model*.bin"))
        return {"bytes": b, "params": b // 2, "quantisable_params": int(b // 2 * 0.9), "largest_matrix_bytes": 0,
                "in_features": {}}
    stats["bytes"] = sum(p.stat().st_size for p in files)
    for name, dtype, shape, nbytes in safetensors_tensors(folder):
        count = math.prod(shape)
        stats["params"] += count
        if len(shape) == 2 and ".layers." in f".{name}" and "embed" not in name:
            stats["quantisable_params"] += count
            stats["in_features"].setdefault(int(shape[1]), name)
            stats["largest_matrix_bytes"] = max(stats["largest_matrix_bytes"], nbytes)
    return stats


def check_group_size(stats: dict, group_size: int, model: str) -> None:
    """Every quantised matrix's input width must be a whole number of groups: the serving kernels (Marlin,
    ExLlama, the CPU int4 kernels) reject a partial last group, so refuse before hours of calibration."""
    if group_size == -1 or not stats.get("in_features"):
        return
    bad = {k: v for k, v in stats["in_features"].items() if k % group_size}
    if bad:
        width, name = sorted(bad.items())[0]
        ok = group_size
        while ok > 16 and any(k % ok for k in stats["in_features"]):
            ok //= 2
        hint = f"use --group-size {ok}" if all(k % ok == 0 for k in stats["in_features"]) else "use --group-size -1"
        raise QuantkitError(f"--group-size {group_size} does not divide the input width {width} of {name} in {model} "
                            f"(serving kernels need whole groups): {hint}")


def estimate_output_bytes(stats: dict, bits: int, group_size: int) -> int:
    q = stats["quantisable_params"]
    other = stats["params"] - q
    g = group_size if group_size > 0 else 4096
    scales = q / g * (2 + bits / 8)  # one 16-bit scale + one packed zero point per group
    return int(q * bits / 8 + scales + other * 2)


def resource_needs(stats: dict, *, method: str, fmt: str, bits: int, group_size: int, offload: bool,
                   gpu_bytes: int = 0) -> dict:
    """Disk and memory a run clearly needs, in bytes (estimates from the safetensors headers).

    * classic (gptqmodel, ``offload_to_disk``): the model is a meta-device shell whose layers are read from
      the checkpoint on demand and written to a disk offload once quantised; host RAM holds the unquantised
      embeddings/head plus a few layers. Disk: the output + the offload (the 16-bit layers).
    * compressed-tensors (llm-compressor): ``from_pretrained`` holds the whole model in host RAM in its
      stored dtype, and one decoder layer at a time goes to the GPU, if any. With ``--offload`` only what
      fits stays in RAM and the rest is spilled to disk next to the output (so disk grows by the model).
    """
    model = stats["bytes"]
    out = estimate_output_bytes(stats, bits, group_size)
    layers16 = stats["quantisable_params"] * 2
    other16 = (stats["params"] - stats["quantisable_params"]) * 2
    whole = model + int(1 * _GB)
    few_layers = min(whole, 8 * stats["largest_matrix_bytes"] + int(2 * _GB))
    if fmt == "classic":
        disk = out + layers16
        memory = min(whole, other16 + few_layers)
    else:
        disk = out + (model if offload else 0)
        memory = few_layers if offload else whole
    return {"disk": int(disk * 1.05), "memory": int(memory), "model": model, "output": out, "gpu": gpu_bytes}


def check_resources(needs: dict, *, free_disk: int, available_memory: int, where: Path) -> None:
    """Refuse to start (QuantkitError) when disk or memory is clearly insufficient."""
    if os.environ.get("QUANTKIT_SKIP_RESOURCE_CHECK"):
        return
    if free_disk < needs["disk"]:
        raise QuantkitError(
            f"not enough disk: this variant needs about {human_size(needs['disk'])} free at {where} "
            f"(output ~{human_size(needs['output'])} plus engine offload), only {human_size(free_disk)} is free; "
            "free some space or choose another --out")
    if available_memory < needs["memory"] * 0.9:
        raise QuantkitError(
            f"not enough memory: loading this {human_size(needs['model'])} model needs about "
            f"{human_size(needs['memory'])} of RAM, only {human_size(available_memory)} is available; "
            "pass --offload to spill weights to disk (--format compressed-tensors), use --format classic "
            "(streams layers from the checkpoint), or use a machine with more RAM")


def _available_memory() -> int:
    import psutil

    vm = psutil.virtual_memory()
    return int(vm.available + psutil.swap_memory().free)


# -- engine environment -------------------------------------------------------------------------

def engine_env_defaults() -> None:
    """Environment gptqmodel reads at import/first use (explicit user values win)."""
    if "GPTQMODEL_CPU_WORKERS" not in os.environ:
        cores = os.cpu_count() or 1
        os.environ["GPTQMODEL_CPU_WORKERS"] = str(max(2, min(12, (cores + 1) // 2)))
    os.environ.setdefault("GPTQMODEL_TORCH_EXTENSIONS_DIR", str(cache_home() / "torch_extensions"))


@contextlib.contextmanager
def stdout_to_stderr():
    """Send whatever the engines print (Python- and C-level) to stderr while they run."""
    sys.stdout.flush()
    try:
        fd_saved = os.dup(1)
    except OSError:  # no real stdout
        fd_saved = None
    if fd_saved is not None:
        os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        try:
            sys.stdout.flush()
        finally:
            if fd_saved is not None:
                os.dup2(fd_saved, 1)
                os.close(fd_saved)


@contextlib.contextmanager
def gptqmodel_logs_redirect():
    """gptqmodel writes ``./logs/<processor>_log_*.log`` into the current directory: send it to the cache."""
    from gptqmodel.looper import loop_processor

    old = loop_processor._PROJECT_LOG_DIR
    loop_processor._PROJECT_LOG_DIR = cache_home() / "logs" / "gptqmodel"
    try:
        yield
    finally:
        loop_processor._PROJECT_LOG_DIR = old


@contextlib.contextmanager
def llmcompressor_cpu_pin_memory_patch():
    """llm-compressor 0.14's AWQ calls ``pin_memory()`` unconditionally, which fails without an accelerator.

    Pinning only speeds host-to-device copies; with no accelerator there is nothing to copy to, so for the
    duration of ``oneshot`` (and only when torch sees no accelerator) the cache's pinning becomes a no-op.
    """
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    has_accel = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    if has_accel:
        yield False
        return
    original = IntermediatesCache.__dict__["pin_memory"]
    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    try:
        yield True
    finally:
        IntermediatesCache.pin_memory = original


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QuantkitError(f"--device {device} was given but torch sees no CUDA GPU (use --device cpu)")
    return device


def _strip_temp_paths(folder: Path) -> None:
    """Remove gptqmodel's random ``offload_to_disk_path`` from the saved configs (reproducible configs)."""
    for name in ("config.json", "quantize_config.json"):
        p = folder / name
        if not p.is_file():
            continue
        data = json.loads(p.read_text())
        qc = data.get("quantization_config", data) if name == "config.json" else data
        meta = qc.get("meta") if isinstance(qc, dict) else None
        if isinstance(meta, dict) and "offload_to_disk_path" in meta:
            meta.pop("offload_to_disk_path")
            p.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


# -- the engines --------------------------------------------------------------------------------

def _run_gptqmodel(method: str, src_path: Path, work: Path, texts: list[str], p: dict, device: str) -> dict:
    engine_env_defaults()
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.quantization import AWQConfig, GPTQConfig

    offload_dir = work / ".gptqmodel-offload"
    common = dict(bits=p["bits"], group_size=p["group_size"], offload_to_disk=True,
                  offload_to_disk_path=str(offload_dir))
    if method == "gptq":
        cfg = GPTQConfig(desc_act=p["act_order"], sym=p["sym"], damp_percent=p["damp"], **common)
        kw = {}
    else:
        cfg = AWQConfig(sym=False, **common)
        kw = {"backend": BACKEND.AWQ_TORCH} if device == "cpu" else {}
    call = {"load": {"model": str(src_path), "quantize_config": type(cfg).__name__, "device": device,
                     **{k: v for k, v in common.items() if k != "offload_to_disk_path"},
                     **({"desc_act": p["act_order"], "sym": p["sym"], "damp_percent": p["damp"]}
                        if method == "gptq" else {"sym": False})},
            "quantize": {"calibration": f"{len(texts)} strings", "batch_size": 1,
                         **({"backend": "AWQ_TORCH"} if kw else {})}}
    with gptqmodel_logs_redirect():
        model = GPTQModel.load(str(src_path), cfg, device=device)
        model.quantize(texts, batch_size=1, **kw)
        model.save(str(work))
    del model
    shutil.rmtree(offload_dir, ignore_errors=True)
    _strip_temp_paths(work)
    return call


def _ct_modifiers(method: str, p: dict):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    group = p["group_size"]
    weights = dict(num_bits=p["bits"], type="int", symmetric=p["sym"],
                   strategy="group" if group > 0 else "channel", group_size=group if group > 0 else None)
    if method == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**weights))
        # actorder at modifier level: its default ("static") would otherwise override a None in the scheme
        return [GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"], dampening_frac=p["damp"],
                             actorder="static" if p["act_order"] else None)]
    from llmcompressor.modifiers.awq import AWQModifier

    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**weights))
    return [AWQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])]


def _run_llmcompressor(method: str, src_path: Path, work: Path, texts: list[str], p: dict, tokenizer,
                       offload: bool) -> dict:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    load_kw = {"dtype": "auto"}
    if offload:
        from compressed_tensors.offload import load_offloaded_model

        offload_dir = work / ".offload"
        with load_offloaded_model():
            model = AutoModelForCausalLM.from_pretrained(src_path, device_map="auto_offload",
                                                         offload_folder=str(offload_dir), **load_kw)
    else:
        model = AutoModelForCausalLM.from_pretrained(src_path, **load_kw)
    recipe = _ct_modifiers(method, p)
    ds = Dataset.from_dict({"text": texts})
    with llmcompressor_cpu_pin_memory_patch() as patched:
        oneshot(model=model, tokenizer=tokenizer, dataset=ds, recipe=recipe, max_seq_length=p["seq_len"],
                num_calibration_samples=len(texts), shuffle_calibration_samples=False)
    model.save_pretrained(str(work), save_compressed=True)
    tokenizer.save_pretrained(str(work))
    shutil.rmtree(work / ".offload", ignore_errors=True)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"load": {"model": str(src_path), "dtype": "auto", "device_map": "auto_offload" if offload else None},
            "oneshot": {"recipe": "recipe.yaml", "max_seq_length": p["seq_len"],
                        "num_calibration_samples": len(texts), "shuffle_calibration_samples": False,
                        "dataset": f"{len(texts)} texts (column text)"},
            "save_pretrained": {"save_compressed": True},
            "cpu_pin_memory_patch": patched}


# -- folders ------------------------------------------------------------------------------------

def _folder_files(folder: Path) -> list[Path]:
    from quantkit.manifest import MANIFEST_NAME

    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _cached(folder: Path, name: str, params: dict, base_sha: str):
    """The existing Manifest when ``folder`` already holds this exact, intact variant; else None.

    Raises when the folder holds something else (another model, other parameters, not ours)."""
    from quantkit.manifest import Manifest

    if not folder.exists():
        return None
    if not folder.is_dir():
        raise QuantkitError(f"{folder} is a file; choose another --out")
    if not Manifest.exists(folder):
        if any(folder.iterdir()):
            raise QuantkitError(f"{folder} exists and is not a quantkit output folder; choose another --out "
                                "or delete it")
        return None
    m = Manifest.load(folder)
    rec = m.artifact(name)
    if m.base.get("sha") and m.base.get("sha") != base_sha:
        raise QuantkitError(f"{folder} holds {name} of {m.base.get('id') or m.base.get('local_path')} at "
                            f"{m.base['sha'][:12]}, not {base_sha[:12]}: delete it or choose another --out")
    if rec is None:
        if m.artifacts:
            raise QuantkitError(f"{folder} holds {', '.join(m.artifacts)}, not {name}; choose another --out")
        return None
    if rec.get("params") != params:
        diff = sorted(k for k in set(rec.get("params", {})) | set(params)
                      if rec.get("params", {}).get(k) != params.get(k))
        raise QuantkitError(f"{folder} holds {name} made with other parameters ({', '.join(diff)}); delete it "
                            "or choose another --out")
    if not m.artifact_is_intact(name):
        return None  # damaged or incomplete: rebuild
    return m


def _copy_license_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for pattern in LICENSE_GLOBS:
        for p in src.glob(pattern):
            if p.is_file() and not (dst / p.name).exists():
                shutil.copy2(p, dst / p.name)
                copied.append(p.name)
    return copied


def _stage(i: int, n: int, text: str) -> None:
    print(f"[{i}/{n}] {text}", file=sys.stderr, flush=True)


def run(method: str, model: str, *, fmt: str = DEFAULT_FORMAT, bits: int = 4, group_size: int = 128,
        sym: bool = True, act_order: bool = True, damp: float = 0.01, calibration: str | None = None,
        samples: int = 128, seq_len: int = 2048, out: str | os.PathLike | None = None,
        revision: str | None = None, allow_pickle: bool = False, device: str = "auto",
        offload: bool = False, adapter: str | None = None, adapter_revision: str | None = None) -> QuantResult:
    """Quantise MODEL with ``method`` (awq|gptq) into one variant folder; see quantize_awq/quantize_gptq.
    With ``adapter`` (a PEFT LoRA) the merged fine-tune is quantised (:func:`quantkit.lora.resolve_source`)."""
    from quantkit.calibration import load_calibration, parse_spec
    from quantkit.lora import resolve_source
    from quantkit.manifest import Manifest, file_record
    from quantkit.util import sha256_file

    if method == "awq":
        sym, act_order, damp_v = False, False, None
    else:
        damp_v = damp
    check_params(method, bits=bits, group_size=group_size, fmt=fmt, samples=samples, seq_len=seq_len,
                 damp=damp_v)
    spec = parse_spec(calibration)  # fail on a malformed SPEC before any download
    n = 6
    _stage(1, n, f"resolving {model}")
    src = resolve_source(model, revision, allow_pickle=allow_pickle, adapter=adapter,
                         adapter_revision=adapter_revision)
    name = variant_name(src.name, method, fmt, bits, group_size, sym)
    folder = Path(out).expanduser() if out else Path.cwd() / name
    folder = folder.absolute()
    params = {"method": method, "format": fmt, "bits": bits, "group_size": group_size, "sym": sym,
              "calibration": spec.source, "samples": samples, "seq_len": seq_len}
    if method == "gptq":
        params.update(act_order=act_order, damp=damp)
    if spec.path is not None:
        params["calibration_file_sha256"] = sha256_file(spec.path)
    cached = _cached(folder, name, params, src.sha)
    if cached is not None:
        _stage(n, n, f"{folder} already holds {name} (intact): nothing to do")
        return QuantResult(folder=folder, name=name, manifest=cached, cached=True)

    stats = weight_stats(src.path)
    check_group_size(stats, group_size, src.name)
    needs = resource_needs(stats, method=method, fmt=fmt, bits=bits, group_size=group_size, offload=offload)
    folder.parent.mkdir(parents=True, exist_ok=True)
    check_resources(needs, free_disk=shutil.disk_usage(folder.parent).free,
                    available_memory=_available_memory(), where=folder.parent)

    _stage(2, n, f"calibration {spec.source}: {samples} x {seq_len} tokens requested")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src.path)
    cal = load_calibration(calibration, tokenizer=tokenizer, samples=samples, seq_len=seq_len)
    device_used = pick_device(device)
    engine = "gptqmodel" if fmt == "classic" else "llmcompressor"
    _stage(3, n, f"{method.upper()} {bits}-bit g{group_size} with {engine} on {device_used} "
                 f"({cal.samples} samples, {cal.token_count} tokens; the engine reports per layer)")

    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(work, 0o777 & ~umask)  # mkdtemp makes it private; the published folder gets the usual mode
    try:
        engine_env_defaults()
        with Timer() as t, stdout_to_stderr():
            if fmt == "classic":
                call = _run_gptqmodel(method, src.path, work, cal.texts, params, device_used)
            else:
                call = _run_llmcompressor(method, src.path, work, cal.texts, params, tokenizer, offload)
        _stage(4, n, f"quantised in {t.seconds:.1f} s; writing recipe, licence and manifest")
        copied = _copy_license_files(src.path, work)
        recipe = {"method": method, "format": fmt, "engine": engine, "params": params,
                  "calibration": cal.as_dict(), "device": device_used, "offload": offload,
                  "engine_call": call, "tools": versions(*ENGINE_DISTS[fmt])}
        (work / RECIPE_NAME).write_text(json.dumps(recipe, indent=2, default=str) + "\n")
        _stage(5, n, "hashing files")
        files = [file_record(work, p) for p in _folder_files(work)]
        size = sum(f["size"] for f in files if f["path"].endswith(".safetensors"))
        manifest = Manifest(work)
        manifest.set_base(**src.manifest_base())
        qc = json.loads((work / "config.json").read_text()).get("quantization_config", {})
        manifest.set_artifact(name, {
            "path": ".",
            "format": method if fmt == "classic" else "compressed-tensors",
            "method": method,
            "type": f"INT{bits}" if fmt == "classic" else f"W{bits}A16",
            "bits": bits,
            "bits_per_weight": round(size * 8 / stats["params"], 3) if stats["params"] else None,
            "group_size": group_size,
            "quant_method": qc.get("quant_method"),
            "engine": engine,
            "files": files,
            "size": size,
            "params": params,
            "calibration": cal.as_dict(),
            "tools": recipe["tools"],
            "device": device_used,
            "seconds": round(t.seconds, 2),
            "created": now_iso(),
            "licence_files": copied,
        })
        manifest.log(method, artifact=name, format=fmt, seconds=round(t.seconds, 2))
        manifest.save()
        _stage(6, n, f"publishing {folder}")
        old = None
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".old", dir=folder.parent))
            os.replace(folder, old / "x")
        os.replace(work, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return QuantResult(folder=folder, name=name, manifest=Manifest.load(folder), cached=False)
