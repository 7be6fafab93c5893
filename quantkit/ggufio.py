"""GGUF files and llama.cpp's own C functions on them: shard names and sets, headers read straight from the file,
the architecture check of llama.cpp's converter, importance matrices, and ``llama_model_quantize``.

Below the engines, measurement and the quantiser command (:mod:`quantkit.gguf`), which all use it; it imports
only facts (:mod:`quantkit.formats`), errors, util and :mod:`quantkit.llamacpp` (where llama.cpp lives).
"""

from __future__ import annotations

import ast
import ctypes
import math
import os
import re
import time
from collections import Counter
from pathlib import Path

from quantkit.errors import QuantkitError
from quantkit.formats import GGUF_TYPES, file_type_name, gguf_spec, quant_size
from quantkit.util import default_threads, progress

# Split GGUFs bigger than this (llama-gguf-split's spelling): 2 GB under the Hub's limit, because
# llama-gguf-split counts only tensor data against it (the first shard also holds the metadata and vocabulary)
# and cuts only between tensors.
DEFAULT_SPLIT_MAX_SIZE = "48G"
_SPLIT_SIZE = re.compile(r"^([1-9][0-9]*)([MG])$")
_SHARD = re.compile(r"^(?P<prefix>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$")


def normalize_types(types) -> list[str]:
    """``"q4_k_m, Q8_0"`` or a list -> ``["Q4_K_M", "Q8_0"]`` (unique, request order); unknown -> QuantkitError."""
    if isinstance(types, str):
        types = types.split(",")
    out: list[str] = []
    for t in types:
        if not str(t).strip():
            continue
        t = gguf_spec(t)[0]
        if t not in out:
            out.append(t)
    if not out:
        raise QuantkitError("no GGUF type given: pass --types, e.g. --types Q4_K_M,Q8_0")
    return out


def split_size_bytes(size: str | None) -> int:
    """llama-gguf-split's ``--split-max-size`` spelling (``48G``, ``500M``: decimal units, as llama.cpp reads
    them) -> bytes; None -> the default. Anything else is a one-line error."""
    m = _SPLIT_SIZE.match(str(size if size is not None else DEFAULT_SPLIT_MAX_SIZE).strip().upper())
    if not m:
        raise QuantkitError(f"split size {size!r} is not in llama.cpp's spelling: a whole number of megabytes or "
                            "gigabytes such as 500M or 48G")
    return int(m.group(1)) * 1000 ** (2 if m.group(2) == "M" else 3)


def shard_name(prefix: str, i: int, n: int) -> str:
    """llama.cpp's shard naming (``llama_split_path``): ``<prefix>-00001-of-00003.gguf``."""
    return f"{prefix}-{i:05d}-of-{n:05d}.gguf"


def shard_count(size_bytes: float, split_max_size: str | None = None) -> int:
    """How many files a GGUF of ``size_bytes`` becomes (1: not split; an estimate for plan, tensors cut)."""
    limit = split_size_bytes(split_max_size)
    return 1 if size_bytes <= limit else math.ceil(size_bytes / limit)


def gguf_entry_points(paths) -> list[Path]:
    """The GGUFs to load among ``paths``: unsplit files and the first shard of every split set."""
    out = []
    for p in map(Path, paths):
        m = _SHARD.match(p.name)
        if m is None or int(m.group("i")) == 1:
            out.append(p)
    return out


def gguf_set_files(path: str | os.PathLike) -> list[Path]:
    """Every file of the GGUF that loads from ``path``: its shards when it is the first of a split set."""
    path = Path(path)
    m = _SHARD.match(path.name)
    if m is None:
        return [path]
    n = int(m.group("n"))
    return [path.with_name(shard_name(m.group("prefix"), i, n)) for i in range(1, n + 1)]


def gguf_set_size(path: str | os.PathLike) -> int:
    """Bytes of the whole GGUF (all shards of a split set) that loads from ``path``."""
    return sum(p.stat().st_size for p in gguf_set_files(path) if p.is_file())


def read_gguf_header(path: str | os.PathLike, max_array: int = 64, offsets: bool = False,
                     digest: str | None = None) -> tuple[dict, list[tuple[str, int, tuple]]]:
    """Metadata and tensor infos of a GGUF file, parsed straight from its header.

    Returns ``(kv, tensors)``: ``kv`` maps keys to values (arrays longer than ``max_array`` become their
    length, e.g. the vocabulary), ``tensors`` is ``[(name, ggml_type_id, shape)]`` (``offsets``: with a fourth
    item, the byte offset of the tensor's data in the file). ``digest="tokenizer."``: ``kv["tokenizer.*sha256"]``
    is the sha256 of the raw bytes of every key/value whose key starts with it (the whole vocabulary). Much faster
    than ``gguf.GGUFReader`` on files with a large vocabulary (it builds a numpy view per token).
    """
    import hashlib
    import mmap
    import struct

    from gguf import GGUFValueType, GGUFWriter

    scalars = {t: "<" + f for t, f in GGUFWriter._simple_value_packing.items()}  # gguf-py's own packing table

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if mm[:4] != b"GGUF":
            raise QuantkitError(f"{path} is not a GGUF file")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", mm, 4)
        pos = 24

        def string(pos):
            (n,) = struct.unpack_from("<Q", mm, pos)
            return mm[pos + 8:pos + 8 + n].decode("utf-8", "replace"), pos + 8 + n

        def value(vtype, pos):
            if vtype in scalars:
                fmt = scalars[vtype]
                return struct.unpack_from(fmt, mm, pos)[0], pos + struct.calcsize(fmt)
            if vtype == GGUFValueType.STRING:
                return string(pos)
            if vtype == GGUFValueType.ARRAY:
                etype, count = struct.unpack_from("<IQ", mm, pos)
                pos += 12
                if etype in scalars and count > max_array:
                    return count, pos + count * struct.calcsize(scalars[etype])
                items = []
                for _ in range(count):
                    if etype == GGUFValueType.STRING:  # strings: walk the lengths
                        (n,) = struct.unpack_from("<Q", mm, pos)
                        if count <= max_array:
                            items.append(mm[pos + 8:pos + 8 + n].decode("utf-8", "replace"))
                        pos += 8 + n
                    else:
                        v, pos = value(etype, pos)
                        items.append(v)
                return (items if count <= max_array else count), pos
            raise QuantkitError(f"{path}: unknown GGUF value type {vtype}")

        kv: dict = {"GGUF.version": version}
        try:
            h = hashlib.sha256()
            for _ in range(n_kv):
                start = pos
                key, pos = string(pos)
                (vtype,) = struct.unpack_from("<I", mm, pos)
                kv[key], pos = value(vtype, pos + 4)
                if digest is not None and key.startswith(digest):
                    h.update(mm[start:pos])
            if digest is not None:
                kv[digest + "*sha256"] = h.hexdigest()
            tensors = []
            for _ in range(n_tensors):
                name, pos = string(pos)
                (n_dims,) = struct.unpack_from("<I", mm, pos)
                dims = struct.unpack_from(f"<{n_dims}Q", mm, pos + 4)
                gtype, offset = struct.unpack_from("<IQ", mm, pos + 4 + 8 * n_dims)
                pos += 4 + 8 * n_dims + 12
                tensors.append((name, gtype, tuple(dims), offset) if offsets else (name, gtype, tuple(dims)))
        except struct.error:  # the header runs past the end of the file
            raise QuantkitError(f"{path} is truncated or damaged: its GGUF header ends before its {n_kv} keys and "
                                f"{n_tensors} tensors are read; download or convert it again") from None
    if offsets:  # tensor data starts at the next multiple of general.alignment
        align = int(kv.get("general.alignment") or 32)
        start = (pos + align - 1) // align * align
        tensors = [(n, t, d, start + o) for n, t, d, o in tensors]
    return kv, tensors


def read_gguf_info(path: str | os.PathLike) -> dict:
    """What a GGUF file holds: file type, tensor type counts, architecture, parameter count, bits per weight."""
    import gguf

    path = Path(path)
    kv, tensors = read_gguf_header(path)
    counts: Counter = Counter()
    n_params = 0
    n_bytes = 0
    for _name, gtype, dims in tensors:
        qt = gguf.GGMLQuantizationType(gtype)
        counts[qt.name] += 1
        numel = 1
        for d in dims:
            numel *= d
        block, type_size = quant_size(qt)
        n_params += numel
        n_bytes += numel // block * type_size
    arch = kv.get("general.architecture")
    ftype_id = kv.get("general.file_type")
    return {
        "path": str(path),
        "size": path.stat().st_size,
        "architecture": arch,
        "name": kv.get("general.name"),
        "file_type": file_type_name(ftype_id) if ftype_id is not None else None,
        "file_type_id": int(ftype_id) if ftype_id is not None else None,
        "tensor_types": dict(counts.most_common()),
        "n_tensors": len(tensors),
        "params": n_params,
        "tensor_bytes": n_bytes,
        "bits_per_weight": round(n_bytes * 8 / n_params, 4) if n_params else None,
        "context_length": kv.get(f"{arch}.context_length") if arch else None,
        "block_count": kv.get(f"{arch}.block_count") if arch else None,
        "quantization_version": kv.get("general.quantization_version"),
        "imatrix": {k.split(".", 2)[-1]: v for k, v in kv.items() if k.startswith("quantize.imatrix.")} or None,
    }


def converter_architectures(src_dir: Path) -> set[str]:
    """The HF architectures llama.cpp's converter registry maps to a text model (read, not imported)."""
    text = (src_dir / "conversion" / "__init__.py").read_text()
    tree = ast.parse(text)
    for node in tree.body:
        target = None
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            target, value = node.target.id, node.value
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            target, value = node.targets[0].id, node.value
        if target == "TEXT_MODEL_MAP":
            return set(ast.literal_eval(value))
    # older layout: @ModelBase.register("Arch", ...) decorators in convert_hf_to_gguf.py
    found = set(re.findall(r'register\(([^)]*)\)', (src_dir / "convert_hf_to_gguf.py").read_text()))
    return {a for grp in found for a in re.findall(r'"([A-Za-z0-9_]+)"', grp)}


def model_architecture(config: dict) -> str | None:
    """The architecture the converter will look up (mirrors conversion.base.get_model_architecture)."""
    arch = None
    if config.get("architectures"):
        arch = config["architectures"][0]
    elif "ssm_cfg" in config:
        arch = config["ssm_cfg"].get("layer", "Mamba") + "ForCausalLM"
    text_cfg = config.get("text_config") or {}
    if text_cfg.get("architectures") and arch not in (
            "StepVLForConditionalGeneration", "Sarashina2VisionForCausalLM", "Exaone4_5_ForConditionalGeneration",
            "Step3p7ForConditionalGeneration", "KimiK3ForConditionalGeneration"):
        arch = text_cfg["architectures"][0]
    return arch

# HF architectures whose llama.cpp loader requires a separate ``output.weight`` (no fallback to the token
# embeddings, src/models/<arch>.cpp creates it without TENSOR_NOT_REQUIRED): a tied-embedding checkpoint
# converts, but llama.cpp then refuses to load it ("tensor 'output.weight' not found"). Real Qwen-MoE models
# are untied; a tied one is refused before converting.
UNTIED_ONLY = {"Qwen2MoeForCausalLM": "qwen2moe"}


def _check_tied_output(arch: str, config: dict) -> None:
    cfg = config.get("text_config") or config
    if arch in UNTIED_ONLY and cfg.get("tie_word_embeddings", False):
        raise QuantkitError(f"{arch} with tie_word_embeddings=true cannot be made into a loadable GGUF: llama.cpp's "
                            f"{UNTIED_ONLY[arch]} loader needs a separate output.weight (the real models are "
                            "untied); untie lm_head in the checkpoint, or use quantkit awq/gptq")


def check_architecture(config: dict) -> str:
    from quantkit import llamacpp

    arch = model_architecture(config)
    if not arch:
        raise QuantkitError("config.json names no architectures: llama.cpp's converter cannot tell what model "
                            "this is (add \"architectures\": [\"...ForCausalLM\"] to config.json)")
    known = converter_architectures(llamacpp.ensure_sources())
    if arch not in known:
        raise QuantkitError(f"architecture {arch} is not supported by llama.cpp's converter "
                            f"(llama-cpp-python {llamacpp.version()}); GGUF needs a model llama.cpp knows, e.g. "
                            "LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM")
    _check_tied_output(arch, config)
    return arch


def converter_version() -> str:
    from quantkit import llamacpp

    return f"llama-cpp-python=={llamacpp.version()}"


def load_imatrix(path: str | os.PathLike) -> tuple[dict[str, "object"], dict]:
    """Read an imatrix GGUF (llama-imatrix's format) into ``{tensor: mean x^2 per column}`` + its metadata."""
    import gguf
    import numpy as np

    r = gguf.GGUFReader(str(path))
    sums, cnts = {}, {}
    for t in r.tensors:
        if t.name.endswith(".in_sum2"):
            sums[t.name[:-8]] = np.array(t.data, dtype=np.float32).reshape(-1)
        elif t.name.endswith(".counts"):
            cnts[t.name[:-7]] = np.array(t.data, dtype=np.float32).reshape(-1)
    out = {}
    for name, s in sums.items():
        c = cnts.get(name)
        if c is None:
            continue
        nmat = len(c)
        s2 = s.reshape(nmat, -1).copy()
        for j in range(nmat):
            s2[j] = s2[j] / c[j] if c[j] > 0 else 1.0
        out[name] = np.ascontiguousarray(s2.reshape(-1), dtype=np.float32)

    def kv(key):
        f = r.fields.get(key)
        return f.contents() if f is not None and f.data else None

    meta = {"datasets": kv("imatrix.datasets"), "chunk_count": kv("imatrix.chunk_count"),
            "chunk_size": kv("imatrix.chunk_size"), "entries": len(out)}
    return out, meta

_QLINE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")


def quantize_file(src: str | os.PathLike, dest: str | os.PathLike, gtype: str, *, threads: int | None = None,
                  imatrix: str | os.PathLike | None = None, imatrix_label: str | None = None,
                  dataset_label: str | None = None, overrides: dict[str, str] | None = None) -> dict:
    """Quantise GGUF ``src`` to ``gtype`` into ``dest`` with ``llama_model_quantize`` (as llama-quantize does).
    ``overrides`` maps tensor-name regexes to ggml types (llama-quantize's ``--tensor-type``).

    Returns ``{"seconds", "imatrix_entries"}``. Raises QuantkitError with llama.cpp's own message on failure.
    """
    import llama_cpp

    gtype = normalize_types([gtype])[0]
    ftype = GGUF_TYPES[gtype].ftype
    const = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gtype}", None) if gtype != "F32" else llama_cpp.LLAMA_FTYPE_ALL_F32
    if const is not None and const != ftype:  # pragma: no cover - guards a renumbered enum
        ftype = const
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = int(threads or default_threads())
    keep = []  # keep ctypes buffers alive during the call
    if overrides:
        import gguf

        tt = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
        for i, (pattern, typ) in enumerate(overrides.items()):
            keep.append(pattern.encode())
            tt[i].pattern = keep[-1]
            tt[i].type = int(gguf.GGMLQuantizationType[typ])
        tt[len(overrides)].pattern = None
        keep.append(tt)
        params.tt_overrides = ctypes.cast(tt, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    n_entries = 0
    if imatrix is not None:
        data, meta = load_imatrix(imatrix)
        n_entries = len(data)
        arr = (llama_cpp.llama_model_imatrix_data * (n_entries + 1))()
        for i, (name, values) in enumerate(sorted(data.items())):
            bname = name.encode()
            keep += [bname, values]
            arr[i].name = bname
            arr[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = values.size
        arr[n_entries].name = None
        keep.append(arr)
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        # the same metadata llama-quantize records (quantize.imatrix.*)
        kvs = [("quantize.imatrix.file", llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR,
                (imatrix_label or Path(imatrix).name)),
               ("quantize.imatrix.entries_count", llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, n_entries)]
        dataset = dataset_label or (meta.get("datasets") or [None])[0]
        if dataset:
            kvs.insert(1, ("quantize.imatrix.dataset", llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR, str(dataset)))
        if meta.get("chunk_count"):
            kvs.append(("quantize.imatrix.chunks_count", llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT,
                        int(meta["chunk_count"])))
        ov = (llama_cpp.llama_model_kv_override * (len(kvs) + 1))()
        for i, (key, tag, val) in enumerate(kvs):
            ov[i].key = key.encode()
            ov[i].tag = tag
            if tag == llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR:
                ov[i].value.val_str = str(val).encode()[:127]
            else:
                ov[i].value.val_i64 = int(val)
        ov[len(kvs)].key = b""
        keep.append(ov)
        params.kv_overrides = ctypes.cast(ov, ctypes.POINTER(llama_cpp.llama_model_kv_override))

    errors: list[str] = []
    bar = progress(total=None, desc=f"quantise {gtype}", unit="tensor")

    @llama_cpp.llama_log_callback
    def _log(level, text, _user):
        s = (text or b"").decode("utf-8", "replace")
        m = _QLINE.match(s)
        if m:
            if bar.total is None:
                bar.reset(total=int(m.group(2)))
            bar.update(1)
        elif level in (2, 3) and s.strip():  # WARN, ERROR
            errors.append(s.strip())
            del errors[:-20]

    llama_cpp.llama_log_set(_log, ctypes.c_void_p(0))
    t0 = time.perf_counter()
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dest).encode(), ctypes.byref(params))
    finally:
        bar.close()
        _restore_llama_log()
    seconds = time.perf_counter() - t0
    if rc != 0:
        msg = next((e for e in reversed(errors) if "failed to quantize" in e), errors[-1] if errors else "no message")
        raise QuantkitError(f"llama.cpp could not quantise to {gtype}: {' '.join(msg.split())[:300]}")
    return {"seconds": seconds, "imatrix_entries": n_entries}


def _restore_llama_log() -> None:
    try:
        import llama_cpp
        from llama_cpp import _logger

        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    except Exception:  # pragma: no cover
        pass
