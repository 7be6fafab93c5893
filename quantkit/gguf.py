"""GGUF path: convert a Hugging Face model once with llama.cpp's own converter, then quantise it to many types.

``quantize_gguf(model, ["Q4_K_M", "Q8_0"])``:

1. resolves MODEL (Hub id or local folder) with :func:`quantkit.hub.resolve_model` and checks, before converting,
   that llama.cpp's converter registry knows its architecture;
2. converts it once to an F32/F16/BF16 GGUF (``convert_hf_to_gguf.py`` from the llama-cpp-python sdist, run in a
   subprocess with its own ``gguf-py`` first on ``PYTHONPATH``) kept in ``<out>/.quantkit-work/`` (never pushed);
3. with ``calibration``, computes an importance matrix from that text (llama.cpp's ``llama-imatrix`` on the
   intermediate GGUF when the tool was built, else torch forward hooks) and writes ``<Model>.imatrix``;
4. quantises each type in-process with ``llama_cpp.llama_model_quantize`` (the same C code as
   ``llama-quantize``; the imatrix goes through ``params.imatrix``) into ``<Model>-<TYPE>.gguf``; a file over
   ``split_max_size`` (default 48G, under the Hub's 50 GB per-file limit) is split by llama.cpp's
   ``llama-gguf-split`` into ``<Model>-<TYPE>-00001-of-0000N.gguf``..., one artifact whose ``path`` is the first
   shard (what llama.cpp loads) and whose ``files`` are every shard;
5. records everything in ``<out>/quantkit.json``.

Processes may share one ``out``: the intermediate, the imatrix and each type are built under a lock of their own
in ``.quantkit-work/locks/``; a process that finds one held waits, then re-uses what the other one built.

Re-running re-uses the download, the intermediate (same base sha + outtype + converter version), the imatrix
(same calibration + intermediate) and every finished variant whose files still match their sha256.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from quantkit import gguf_mix, trust
from quantkit.errors import QuantkitError
from quantkit.formats import GGUF_TYPES, PREFIX, gguf_spec, is_auto, parse_auto
from quantkit.ggufio import (
    DEFAULT_SPLIT_MAX_SIZE,
    check_architecture,
    converter_version,
    load_imatrix,
    normalize_types,
    quantize_file,
    read_gguf_info,
    split_size_bytes,
)
from quantkit.manifest import Manifest, file_record
from quantkit.util import (
    PARTIAL_SUFFIX,
    Timer,
    atomic_path,
    default_threads,
    file_lock,
    format_table,
    human_size,
    now_iso,
    progress,
    sha256_file,
    versions,
)
from quantkit.verify import gguf_bits, raise_if_failed, verify_recorded, verify_status

if TYPE_CHECKING:
    from quantkit.hub import ModelSource

OUTTYPES = ("f32", "f16", "bf16", "auto")
WORK_DIR = ".quantkit-work"
TABLE_HEADERS = ["type", "file", "size", "bits/weight", "seconds", "status", "verify"]
IMATRIX_SAMPLES = 64   # chunks of calibration text fed to the importance matrix
IMATRIX_CTX = 512      # tokens per chunk (llama-imatrix's default context)
AUTO_F32_MAX_PARAMS = 1_000_000_000  # outtype auto: keep fp32 weights as F32 up to this size


# ------------------------------------------------------------------------------------------ result

@dataclass
class GGUFResult:
    folder: Path
    manifest: Manifest
    artifacts: list[str]                      # manifest artifact names (= file names), in request order
    built: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    converted: bool = False                   # True when this run ran the HF -> GGUF converter
    imatrix: Path | None = None

    def paths(self) -> list[Path]:
        return [self.folder / self.manifest.artifacts[a]["path"] for a in self.artifacts]

    def table_rows(self) -> list[list]:
        rows = []
        for name in self.artifacts:
            rec = self.manifest.artifacts[name]
            n = len(rec["files"])
            rows.append([rec["type"], rec["path"] + (f" (+{n - 1} shards)" if n > 1 else ""),
                         human_size(rec["size"]), f"{rec['bits_per_weight']:.2f}",
                         f"{rec.get('seconds', 0.0):.1f}", "built" if name in self.built else "reused",
                         verify_status(rec)])
        return rows

    def table(self) -> str:
        return format_table(self.table_rows(), TABLE_HEADERS)

    def to_json(self) -> dict:
        return {
            "folder": str(self.folder),
            "artifacts": {a: self.manifest.artifacts[a] for a in self.artifacts},
            "built": self.built,
            "reused": self.reused,
            "converted": self.converted,
            "imatrix": str(self.imatrix) if self.imatrix else None,
            "intermediates": self.manifest.data.get("intermediates", {}),
            "manifest": str(self.manifest.path),
        }


# ----------------------------------------------------------------------------------------- helpers


def artifact_name(model_name: str, gtype: str) -> str:
    return f"{model_name}-{gtype.replace(PREFIX, 'auto-')}.gguf"


# ------------------------------------------------------------------------------------------ splits


def split_gguf(src: Path, dest: Path, split_max_size: str) -> list[Path]:
    """Split GGUF ``src`` with llama.cpp's ``llama-gguf-split --split`` into the shards of ``dest``
    (``<dest stem>-0000i-of-0000n.gguf`` beside it); returns them in order. The shards are written in a hidden
    temporary folder and moved to their names only when all are complete."""
    import shutil
    import tempfile

    from quantkit import llamacpp

    exe, env = llamacpp.tool("llama-gguf-split")
    if not exe.exists():
        raise QuantkitError(f"{dest.name} is over {split_max_size} and needs splitting, but llama.cpp's "
                            "llama-gguf-split was not built: re-install with scripts/install.sh")
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{dest.stem}.", suffix=".split" + PARTIAL_SUFFIX, dir=dest.parent))
    try:
        cmd = [str(exe), "--split", "--split-max-size", split_max_size.upper(), str(src), str(tmpdir / dest.stem)]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        shards = sorted(tmpdir.glob(f"{dest.stem}-*-of-*.gguf"))
        if r.returncode != 0 or not shards:
            tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
            raise QuantkitError(f"llama-gguf-split could not split {dest.name} ({tail[0][:300]})")
        out = []
        for p in shards:
            _public(p)
            final = dest.parent / p.name
            os.replace(p, final)
            out.append(final)
        return out
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


# ------------------------------------------------------------------------------------- outtype

def _safetensors_stats(folder: Path) -> tuple[Counter, int, int]:
    """(dtype counts over 2-D+ tensors, total parameters, number of tensors) from safetensors headers only."""
    from quantkit.util import safetensors_tensors

    dtypes: Counter = Counter()
    n_params = n_tensors = 0
    for _, dtype, shape, _ in safetensors_tensors(folder):
        numel = math.prod(shape)
        n_params += numel
        n_tensors += 1
        if len(shape) >= 2:
            dtypes[dtype] += numel
    return dtypes, n_params, n_tensors


def resolve_outtype(outtype: str, folder: Path) -> str:
    """``auto``: bf16 for bf16 weights, f16 for f16, f32 for fp32 models up to 1B parameters, f16 above."""
    outtype = (outtype or "auto").lower()
    if outtype not in OUTTYPES:
        raise QuantkitError(f"--outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    if outtype != "auto":
        return outtype
    dtypes, n_params, _ = _safetensors_stats(folder)
    if not dtypes:
        return "f16"
    main = dtypes.most_common(1)[0][0]
    if main == "BF16":
        return "bf16"
    if main == "F32" and n_params <= AUTO_F32_MAX_PARAMS:
        return "f32"
    return "f16"


# ------------------------------------------------------------------------------------- convert

_TENSOR_LINE = re.compile(r"^INFO:hf-to-gguf:[^\s,]+,\s+torch\.\w+ --> ")
_WRITING = re.compile(r"Writing:\s+\d+%\|.*?\|\s*([\d.]+)([kMGT]?)/([\d.]+)([kMGT]?)")
_SCALE = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def gguf_py_version() -> str | None:
    from quantkit import llamacpp

    try:
        text = (llamacpp.ensure_sources() / "gguf-py" / "pyproject.toml").read_text()
    except OSError:
        return None
    m = re.search(r'^version\s*=\s*"([^"]+)"', text, re.M)
    return m.group(1) if m else None


def _run_converter(src_path: Path, dest: Path, outtype: str, model_name: str, log_path: Path,
                   n_tensors_hint: int) -> None:
    """Run llama.cpp's convert_hf_to_gguf.py into ``dest`` (a temporary path), streaming its progress."""
    from quantkit import llamacpp

    conv_dir = llamacpp.ensure_sources()
    cmd = [sys.executable, str(conv_dir / "convert_hf_to_gguf.py"), str(src_path), "--outtype", outtype,
           "--outfile", str(dest), "--model-name", model_name]
    env = llamacpp.converter_env()
    env.setdefault("PYTHONUNBUFFERED", "1")
    tail: list[str] = []
    with open(log_path, "wb") as log, progress(total=n_tensors_hint or None, desc=f"convert -> {outtype.upper()}",
                                               unit="tensor") as bar:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        buf = b""
        writing = False
        try:
            while True:
                chunk = proc.stdout.read1(65536) if hasattr(proc.stdout, "read1") else proc.stdout.read(4096)
                if not chunk:
                    break
                log.write(chunk)
                buf += chunk
                parts = re.split(rb"[\r\n]", buf)
                buf = parts.pop()
                for raw in parts:
                    line = raw.decode("utf-8", "replace").strip()
                    if not line:
                        continue
                    tail.append(line)
                    del tail[:-40]
                    if not writing and _TENSOR_LINE.match(line):
                        if bar.total is not None and bar.n >= bar.total:
                            bar.total = bar.n + 1
                        bar.update(1)
                    m = _WRITING.search(line)
                    if m:
                        done = float(m.group(1)) * _SCALE[m.group(2)]
                        total = float(m.group(3)) * _SCALE[m.group(4)]
                        if not writing:
                            writing = True
                            bar.set_description(f"convert -> {outtype.upper()} (write)")
                            bar.unit, bar.unit_scale = "B", True
                            bar.reset(total=int(total))
                        bar.update(max(0, int(done) - bar.n))
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        rc = proc.wait()
    if rc != 0:
        errors = [ln for ln in tail if ln.startswith(("ERROR", "Traceback")) or "Error" in ln]
        last = (errors[-1] if errors else (tail[-1] if tail else "no output")).strip()
        raise QuantkitError(f"llama.cpp's converter failed on {src_path.name} ({last[:300]}); full log: {log_path}")
    if not dest.is_file() or dest.stat().st_size == 0:
        raise QuantkitError(f"llama.cpp's converter wrote nothing to {dest}; full log: {log_path}")


# ------------------------------------------------------------------------------------- imatrix

def _load_calibration(spec: str, tokenizer):
    try:
        from quantkit.calibration import load_calibration
    except ImportError:  # pragma: no cover - calibration.py is part of the package
        raise QuantkitError("quantkit.calibration is missing from this install") from None
    return load_calibration(spec, tokenizer=tokenizer, samples=IMATRIX_SAMPLES, seq_len=IMATRIX_CTX)


def _tokenizer(folder: Path):
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder), **trust.hf_kwargs())
    except Exception:  # a model whose tokenizer transformers cannot load still gets a character estimate
        return None


def imatrix_method() -> str:
    """``llama-imatrix`` when llama.cpp's tool was built, else ``torch`` (QUANTKIT_IMATRIX forces one)."""
    forced = os.environ.get("QUANTKIT_IMATRIX", "").strip().lower()
    if forced in ("torch", "llama-imatrix"):
        return forced
    from quantkit import llamacpp

    try:
        d = llamacpp.tools_dir()
    except Exception:
        d = None
    return "llama-imatrix" if d is not None and (d / "llama-imatrix").exists() else "torch"


def _imatrix_ctx(token_count: int | None, n_chars: int) -> int:
    n = token_count if token_count else n_chars // 4
    n = int(n * 0.9)  # llama.cpp's own tokenizer may count a little differently
    ctx = IMATRIX_CTX
    while ctx > 32 and n < 2 * ctx:
        ctx //= 2
    if n < 2 * ctx:
        raise QuantkitError(f"the calibration text is too short for an importance matrix ({n} tokens; give "
                            "at least a few hundred tokens of text)")
    return ctx


def _imatrix_llama(intermediate: Path, text_file: Path, dest: Path, ctx: int, threads: int, log_path: Path,
                   chunks: int) -> None:
    from quantkit import llamacpp

    exe, env = llamacpp.tool("llama-imatrix")
    cmd = [str(exe), "-m", str(intermediate), "-f", str(text_file), "-o", str(dest), "-c", str(ctx),
           "-b", str(ctx), "--chunks", str(chunks), "-t", str(threads), "--no-ppl", "--output-format", "gguf"]
    tail: list[str] = []
    with open(log_path, "wb") as log, progress(total=None, desc="imatrix (llama-imatrix)", unit="s") as bar:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        t0 = time.time()
        try:
            for raw in iter(proc.stdout.readline, b""):
                log.write(raw)
                line = raw.decode("utf-8", "replace").strip()
                if line:
                    tail.append(line)
                    del tail[:-40]
                bar.update(int(time.time() - t0) - bar.n)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        rc = proc.wait()
    if rc != 0 or not dest.is_file():
        errors = [ln for ln in tail if "error" in ln.lower() or "failed" in ln.lower()]
        raise QuantkitError(f"llama-imatrix failed ({(errors or tail or ['no output'])[-1][:300]}); "
                            f"full log: {log_path}")


def _imatrix_torch(model_dir: Path, intermediate: Path, texts: list[str], dest: Path, ctx: int, threads: int,
                   source: str) -> None:
    """Importance matrix with torch forward hooks: sum of x^2 per input column of every Linear (not lm_head),
    written in llama-imatrix's GGUF format under llama.cpp's tensor names."""
    import gguf
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = read_gguf_info(intermediate)
    arch_by_name = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    arch = arch_by_name.get(info["architecture"])
    if arch is None:
        raise QuantkitError(f"the torch importance matrix does not know llama.cpp architecture "
                            f"{info['architecture']}; build llama.cpp's tools (scripts/install.sh) for llama-imatrix")
    tmap = gguf.get_tensor_name_map(arch, int(info["block_count"] or 0))
    torch.set_num_threads(max(1, threads))
    tok = AutoTokenizer.from_pretrained(str(model_dir), **trust.hf_kwargs())
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, **trust.hf_kwargs())
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or name.endswith("lm_head"):
            continue
        gname = tmap.get_name(name)
        if gname is None:
            continue
        gname += ".weight"

        def hook(_m, inputs, _out, gname=gname):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            s = (x * x).sum(0)
            sums[gname] = sums[gname] + s if gname in sums else s
            counts[gname] = counts.get(gname, 0) + x.shape[0]

        hooks.append(mod.register_forward_hook(hook))
    ids = tok("\n\n".join(texts), return_tensors=None, add_special_tokens=False)["input_ids"]
    bos = tok.bos_token_id
    chunks = [ids[i:i + ctx] for i in range(0, len(ids) - ctx + 1, ctx)][:IMATRIX_SAMPLES]
    with torch.no_grad():
        for c in progress(chunks, desc="imatrix (torch)", unit="chunk"):
            if bos is not None:
                c = [bos] + c[:-1]
            model(torch.tensor([c]))
    for h in hooks:
        h.remove()
    w = gguf.GGUFWriter(str(dest), arch=info["architecture"])
    # llama-imatrix's layout: general.type + imatrix.* keys, "<tensor>.in_sum2" (n x 1) and "<tensor>.counts"
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", [source])
    w.add_uint32("imatrix.chunk_count", len(chunks))
    w.add_uint32("imatrix.chunk_size", ctx)
    for gname in sorted(sums):
        w.add_tensor(f"{gname}.in_sum2", sums[gname].numpy().astype(np.float32).reshape(1, -1))
        w.add_tensor(f"{gname}.counts", np.array([[float(counts[gname])]], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ------------------------------------------------------------------------------------ pipeline

def _tools() -> dict:
    t = versions("llama-cpp-python", "gguf", "transformers", "torch", "safetensors")
    t["gguf-py (converter)"] = gguf_py_version()
    t["converter"] = f"convert_hf_to_gguf.py from the {converter_version()} sdist"
    return t


def _public(path: Path) -> None:
    """Give a finished file the usual permissions (atomic_path's temporary files are created 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _intact(folder: Path, rec: dict | None, check_sha: bool = True) -> bool:
    """The recorded file is there with its size and sha256 (or, ``check_sha=False``, its size and mtime)."""
    if not rec or not rec.get("path"):
        return False
    p = folder / rec["path"]
    if not p.is_file() or p.stat().st_size != rec.get("size"):
        return False
    if not check_sha:
        return p.stat().st_mtime_ns == rec.get("mtime_ns")
    return sha256_file(p) == rec.get("sha256")


def _preload(src, verify: bool, threads: int) -> None:
    """While the converter subprocess runs (it leaves a core idle): import what quantising needs and, when the
    variants will be verified, compute the base's reference for it (:func:`quantkit.verify.prepare`)."""
    try:
        import gguf  # noqa: F401
        import llama_cpp  # noqa: F401
    except Exception:  # the main thread will report it
        return
    if verify:
        from quantkit.verify import prepare

        prepare(src.path, src.sha, threads=max(1, threads - 1))


def _ahead(target, *args, **kwargs):
    """``target`` started in a daemon thread (joined before its result is needed)."""
    import threading

    t = threading.Thread(target=target, args=args, kwargs=kwargs, name="quantkit-ahead", daemon=True)
    t.start()
    return t


def _lock(work: Path, what: str):
    """The lock one artifact (or intermediate) is built under, so two processes never build it twice."""
    return file_lock(work / "locks" / f"{what}.lock", what=f"{what} is being built by another process")


def _layout_ok(rec: dict, split_bytes: int, split_arg: str) -> bool:
    """Does a finished artifact have the layout asked for now (split with the same size, or one small file)?"""
    if len(rec.get("files") or []) > 1:
        return (rec.get("params") or {}).get("split_max_size") == split_arg
    return (rec.get("size") or 0) <= split_bytes


def _place(tmp: Path, dest: Path, split_bytes: int, split_arg: str) -> list[Path]:
    """Move a finished quantisation onto ``dest``, or split it into llama.cpp shards when over the limit."""
    if tmp.stat().st_size <= split_bytes:
        _public(tmp)
        os.replace(tmp, dest)
        return [dest]
    return split_gguf(tmp, dest, split_arg)


def quantize_gguf(model: str | ModelSource, types: list[str], out: str | Path | None = None, *, revision=None,
                  calibration: str | None = None, allow_pickle=False, outtype="auto",
                  threads=None, verify: bool = True, split_max_size: str | None = None,
                  adapter: str | None = None, adapter_revision: str | None = None) -> GGUFResult:
    """Convert MODEL once and quantise it to every type in ``types``; see the module docstring. Each type is
    verified against the base once written (:mod:`quantkit.verify`; ``verify=False`` records it as skipped). With
    ``adapter`` (a PEFT LoRA), the merged fine-tune is what is converted (:func:`quantkit.lora.resolve_source`)."""
    from quantkit.lora import resolve_source

    types = normalize_types(types)
    split_bytes = split_size_bytes(split_max_size)
    split_arg = str(split_max_size or DEFAULT_SPLIT_MAX_SIZE).strip().upper()
    need_imatrix = [t for t in types if gguf_spec(t)[1]]
    if need_imatrix and not calibration:
        raise QuantkitError(f"{', '.join(need_imatrix)} need an importance matrix: pass --calibration FILE "
                            "(a text file, or 'builtin')")
    if (outtype or "auto").lower() not in OUTTYPES:
        raise QuantkitError(f"--outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    if threads is not None and int(threads) < 1:
        raise QuantkitError(f"--threads must be at least 1 (got {threads})")
    threads = int(threads or default_threads())
    if calibration:
        from quantkit.calibration import parse_spec

        parse_spec(calibration)  # bad SPEC -> one-line error before any download

    src = resolve_source(model, revision, allow_pickle=allow_pickle, adapter=adapter,
                         adapter_revision=adapter_revision)
    check_architecture(src.config)
    outtype = resolve_outtype(outtype, src.path)
    folder = Path(out) if out else Path.cwd() / f"{src.name}-GGUF"
    folder.mkdir(parents=True, exist_ok=True)
    folder = folder.resolve()
    work = folder / WORK_DIR
    manifest = Manifest.load(folder)
    manifest.set_base(**src.manifest_base())
    manifest.save()
    inter = manifest.data["intermediates"]
    tools = _tools()
    conv_key = _conv_key(src, outtype)

    # calibration (cheap) first: its identity decides which finished variants are still valid
    calib = None
    if calibration:
        calib = _load_calibration(calibration, _tokenizer(src.path))
    method = imatrix_method() if calib else None
    imx_key = ({"calibration_sha256": calib.sha256, "method": method, **conv_key} if calib else None)

    names = {t: artifact_name(src.name, t) for t in types}

    def usable(t: str) -> bool:
        rec = manifest.artifact(names[t])
        return (rec is not None and rec.get("type") == t and (rec.get("params") or {}).get("outtype") == outtype
                and ((rec.get("params") or {}).get("imatrix") or {}).get("key") == imx_key
                and _layout_ok(rec, split_bytes, split_arg) and manifest.artifact_is_intact(names[t]))

    todo = [t for t in types if not usable(t)]
    reused = [t for t in types if t not in todo]

    imatrix_path = folder / f"{src.name}.imatrix" if calib else None

    def imatrix_ok() -> bool:
        imx_rec = inter.get("imatrix")
        return calib is None or (imx_rec is not None and imx_rec.get("key") == imx_key and _intact(folder, imx_rec))

    converted = False
    inter_path = None
    ahead = []
    if todo or not imatrix_ok():
        ahead.append(_ahead(_preload, src, verify and bool(todo), threads))
        inter_path, converted = _ensure_intermediate(src, folder, work, manifest, conv_key, outtype)
        if verify and todo:  # llama.cpp's token ids of the verify text (every type shares the vocabulary)
            from quantkit.verify import prepare

            ahead.append(_ahead(prepare, src.path, src.sha, gguf=inter_path))

    if calib is not None and not imatrix_ok():
        with _lock(work, imatrix_path.name):
            manifest.refresh()
            if not imatrix_ok():
                _build_imatrix(src, calib, method, inter_path, imatrix_path, work, manifest, imx_key, threads,
                               tools)
    imx_rec = inter.get("imatrix") if calib else None

    built = []
    checks = {}
    for t in todo:
        name = names[t]
        with _lock(work, name):
            manifest.refresh()
            if usable(t):  # another process built it while this one waited
                reused.append(t)
                continue
            mix_args = dict(src=src, inter_path=inter_path, imatrix_path=imatrix_path, imatrix_key=imx_key,
                            calib=calib, work=work) if is_auto(t) else None
            paths, q, info, seconds, mix = _quantize_one(inter_path, folder / name, t, threads, split_bytes,
                                                         split_arg, imatrix_path if calib else None, calib, mix_args)
            for f in (manifest.artifact(name) or {}).get("files") or []:  # an old layout's leftover files
                if folder / f["path"] not in paths:
                    (folder / f["path"]).unlink(missing_ok=True)
            _record_variant(manifest, name, t, paths, q, info, seconds, outtype, threads, split_arg, calib,
                            imatrix_path, imx_rec, imx_key, tools, mix)
        built.append(name)
        for a in ahead:
            a.join()
        ahead = []
        checks[name] = verify_recorded(manifest, name, src.path, bits=gguf_bits(t), enabled=verify,
                                       base_sha=src.sha, threads=threads)

    if not todo:
        manifest.log("gguf.resume", reused=[names[t] for t in reused])
        manifest.save()
    reused = [t for t in types if t in reused]
    for t in reused:  # a passed check is re-used; a missing or failed one is done now
        checks[names[t]] = verify_recorded(manifest, names[t], src.path, bits=gguf_bits(t), enabled=verify,
                                           base_sha=src.sha, threads=threads)
    raise_if_failed(checks, folder)
    return GGUFResult(folder=folder, manifest=manifest, artifacts=[names[t] for t in types], built=built,
                      reused=[names[t] for t in reused], converted=converted,
                      imatrix=imatrix_path if calib else None)


def _conv_key(src, outtype: str) -> dict:
    """What the intermediate GGUF depends on: base commit, outtype, converter version (and the base's own code,
    when the user let it run)."""
    return {"base_sha": src.sha, "outtype": outtype, "converter": converter_version(),
            **({"trust_remote_code": True} if getattr(src, "trust_remote_code", False) else {})}


def unquantised_gguf(folder: str | os.PathLike) -> Path:
    """The F32/F16/BF16 GGUF the variants of a quantkit GGUF folder were quantised from (``intermediates.convert``):
    the recorded file when it is still there, else converted again from the base on disk (same outtype)."""
    from quantkit.hub import resolve_model

    folder = Path(folder).resolve()
    manifest = Manifest.load(folder, create=False)
    rec = manifest.data["intermediates"].get("convert") or {}
    if _intact(folder, rec, check_sha=False):
        return folder / rec["path"]
    local = manifest.base.get("local_path")
    if not local or not (Path(local) / "config.json").is_file():
        raise QuantkitError(f"{folder} no longer holds its unquantised GGUF and its base "
                            f"({local or manifest.base.get('id')}) is not on disk to convert it again")
    src = resolve_model(local)
    outtype = rec.get("outtype") or resolve_outtype("auto", src.path)
    path, _ = _ensure_intermediate(src, folder, folder / WORK_DIR, manifest, _conv_key(src, outtype), outtype)
    return path
def _quantize_one(inter_path: Path, dest: Path, t: str, threads: int, split_bytes: int, split_arg: str,
                  imatrix_path: Path | None, calib, mix_args: dict | None = None
                  ) -> tuple[list[Path], dict, dict, float, dict | None]:
    """Quantise the intermediate to type ``t`` (an ``auto:`` type: the measured per-tensor mix of
    :mod:`quantkit.gguf_mix`, built with ``mix_args``) under a temporary name, then place it (split when too
    big)."""
    import tempfile

    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=PARTIAL_SUFFIX, dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        qargs = {"imatrix": imatrix_path, "imatrix_label": imatrix_path.name if imatrix_path else None,
                 "dataset_label": calib.source if calib else None}
        mix = None
        with Timer() as tm:
            if mix_args is not None:
                q, mix = gguf_mix.build(parse_auto(t), tmp, threads=threads, quantize_kwargs=qargs,
                                        **mix_args)
            else:
                q = quantize_file(inter_path, tmp, t, threads=threads, **qargs)
            info = read_gguf_info(tmp)
            paths = _place(tmp, dest, split_bytes, split_arg)
    finally:
        tmp.unlink(missing_ok=True)
    return paths, q, info, tm.seconds, mix


def _record_variant(manifest: Manifest, name: str, t: str, paths: list[Path], q: dict, info: dict, seconds: float,
                    outtype: str, threads: int, split_arg: str, calib, imatrix_path, imx_rec, imx_key,
                    tools: dict, mix: dict | None = None) -> None:
    folder = manifest.folder
    inter = manifest.data["intermediates"]
    rec = {
        "path": paths[0].name,
        "format": "gguf",
        "method": "gguf",
        "type": t,
        "bits_per_weight": info["bits_per_weight"],
        "files": [file_record(folder, p) for p in paths],
        "params": {
            "type": t,
            "ftype": GGUF_TYPES[mix["file_type"] if mix else t].ftype,
            "outtype": outtype,
            "intermediate": {k: inter["convert"].get(k) for k in ("path", "size", "file_type", "created")},
            "imatrix": ({"name": imatrix_path.name, "sha256": imx_rec["sha256"], "method": imx_rec["method"],
                         "entries": q["imatrix_entries"], "key": imx_key} if calib else None),
            "nthread": threads,
            "split_max_size": split_arg,
        },
        "calibration": calib.as_dict() if calib else None,
        "gguf": {k: info[k] for k in ("architecture", "file_type", "tensor_types", "params", "n_tensors")},
        **({"mix": mix} if mix else {}),
        "tools": tools,
        "seconds": round(seconds, 3),
        "created": now_iso(),
    }
    rec["size"] = sum(f["size"] for f in rec["files"])
    if len(paths) > 1:
        rec["split"] = {"shards": len(paths), "max_size": split_arg, "tool": "llama-gguf-split"}
    manifest.set_artifact(name, rec)
    manifest.log("gguf.quantize", artifact=name, type=t, seconds=round(seconds, 3),
                 imatrix=bool(calib), shards=len(paths))
    manifest.save()


def _ensure_intermediate(src, folder: Path, work: Path, manifest: Manifest, conv_key: dict,
                         outtype: str) -> tuple[Path, bool]:
    """The F32/F16/BF16 GGUF of this base: re-used when its key and sha256 match, else converted (once)."""
    inter = manifest.data["intermediates"]
    rec = inter.get("convert")
    # a private work file: size + mtime identify it (hashing a multi-GB intermediate on every run costs more
    # than it protects; the variants made from it are checked by sha256)
    if rec and rec.get("key") == conv_key and _intact(folder, rec, check_sha=False):
        return folder / rec["path"], False
    with _lock(work, "convert"):
        manifest.refresh()  # another process may have converted while this one waited
        rec = inter.get("convert")
        if rec and rec.get("key") == conv_key and _intact(folder, rec, check_sha=False):
            return folder / rec["path"], False
        work.mkdir(parents=True, exist_ok=True)
        if rec and rec.get("path") and (folder / rec["path"]).is_file() and rec.get("key") != conv_key:
            (folder / rec["path"]).unlink()  # a stale intermediate (other outtype / base / converter)
        dest = work / f"{src.name}-{outtype.upper()}.gguf"
        _, _, n_tensors = _safetensors_stats(src.path)
        with Timer() as tm:
            with atomic_path(dest) as tmp:
                _run_converter(src.path, tmp, outtype, src.name, work / "convert.log", n_tensors)
        _public(dest)
        info = read_gguf_info(dest)
        st = dest.stat()
        inter["convert"] = {
            "path": dest.relative_to(folder).as_posix(),
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "key": conv_key,
            "outtype": outtype,
            "file_type": info["file_type"],
            "architecture": info["architecture"],
            "params": info["params"],
            "seconds": round(tm.seconds, 3),
            "tools": {"converter": converter_version(), "gguf-py": gguf_py_version()},
            "created": now_iso(),
        }
        manifest.log("gguf.convert", outtype=outtype, path=inter["convert"]["path"], seconds=round(tm.seconds, 3))
        manifest.save()
        return dest, True


def _build_imatrix(src, calib, method: str, inter_path: Path, imatrix_path: Path, work: Path, manifest: Manifest,
                   imx_key: dict, threads: int, tools: dict) -> None:
    work.mkdir(parents=True, exist_ok=True)
    text = "\n\n".join(calib.texts)
    text_file = work / "calibration.txt"
    with atomic_path(text_file) as tmp:
        tmp.write_text(text, encoding="utf-8")
    ctx = _imatrix_ctx(calib.token_count, len(text))
    with Timer() as tm:
        with atomic_path(imatrix_path) as tmp:
            if method == "llama-imatrix":
                # llama-imatrix wants a .gguf suffix for its GGUF format; write there, then move onto tmp
                tmp_gguf = work / "imatrix.partial.gguf"
                _imatrix_llama(inter_path, text_file, tmp_gguf, ctx, threads, work / "imatrix.log",
                               chunks=IMATRIX_SAMPLES)
                os.replace(tmp_gguf, tmp)
            else:
                tmp_gguf = work / "imatrix.partial.gguf"
                _imatrix_torch(src.path, inter_path, calib.texts, tmp_gguf, ctx, threads, calib.source)
                os.replace(tmp_gguf, tmp)
    _public(imatrix_path)
    _, meta = load_imatrix(imatrix_path)
    folder = manifest.folder
    manifest.data["intermediates"]["imatrix"] = {
        **file_record(folder, imatrix_path),
        "key": imx_key,
        "method": method,
        "format": "gguf-imatrix",
        "ctx": ctx,
        "chunks": meta.get("chunk_count"),
        "entries": meta.get("entries"),
        "calibration": calib.as_dict(),
        "tools": tools,
        "seconds": round(tm.seconds, 3),
        "created": now_iso(),
    }
    manifest.log("gguf.imatrix", method=method, seconds=round(tm.seconds, 3), calibration=calib.source)
    manifest.save()
