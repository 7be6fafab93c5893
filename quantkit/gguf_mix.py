"""Measured per-tensor GGUF mixes: ``--types auto:Q4_K_M`` (or ``auto:4.5bpw``, ``auto:3.2GB``).

A llama.cpp preset (Q4_K_M, ...) is a fixed, hand-made rule for which tensors get more bits. ``auto:`` assigns a
standard ggml type to every weight tensor from measurements on *this* model and the *calibration* text:

1. **Sensitivity** (:func:`sensitivities`): the intermediate GGUF is quantised once per candidate type
   (:data:`CANDIDATES`, every tensor forced to it, with the importance matrix) by llama.cpp itself; for each
   tensor and type the error proxy is the imatrix-weighted squared error ``sum_j imatrix_j * sum_i dW_ij^2``
   (= the expected squared error of that matrix's output on the calibration activations), computed on up to
   :data:`SAMPLE_ROWS` evenly spaced rows (rows quantise independently) and scaled to the whole tensor, plus the
   tensor's exact byte count. A tensor without an imatrix entry (an untied embedding lookup) gets uniform
   weights. That proxy is in output-error units that compare neither across tensor kinds nor across depth, so it
   is put into KLD units by measurement (:func:`_calibrate`): one file per category (``attn_q``, ``ffn_down``,
   ``output``, ...) and one per layer, each with only that group at :data:`PROBE` and the rest at Q8_0, is scored
   against the base on the calibration text, and a per-tensor factor ``scale(category) x gain(layer)`` is fitted
   to the measured KLD increases. The table is cached by base SHA + intermediate + imatrix key (calibration
   sha256, method) + candidates + llama.cpp version, so every budget re-uses it.
2. **Allocation** (:func:`allocate`): start every tensor at its cheapest option and take upgrades in order of
   error removed per byte (the lower convex hull of each tensor's (bytes, error) points), while the predicted
   file size stays within the budget. The predicted size is exact: header bytes + every tensor's bytes aligned
   to ``general.alignment``.
3. **Check** (:func:`build`): the mix and the preset (same imatrix) are both scored against the HF base on the
   second half of the calibration samples (the probes are scored on the first, :func:`split_calibration`; never
   on the eval text); when the mix's mean KLD is not lower, or its file is larger, the
   preset's own assignment is used instead (``fallback`` in the record says so). For ``auto:4.5bpw`` /
   ``auto:3.2GB`` the preset is the largest K mix whose file fits the budget (up to :data:`PRESET_TRIES` are
   quantised to find it; none: the mix stands alone).

Search cost (once per model + calibration): one quantisation per candidate (6), a read-back of a row sample, one
Q8_0-speed pass + one short eval per tensor category (~8) and per layer (at most :data:`LAYER_PROBES`); per
budget: two quantisations (preset + mix) and one eval of both on :data:`CHECK_TOKENS` calibration tokens (the
base's distribution is computed once and cached). The files are made with ``llama_model_quantize`` and its
``tt_overrides`` (the same code as ``llama-quantize --tensor-type``), so every tensor has a standard type and the
result loads everywhere.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from quantkit.errors import QuantkitError
from quantkit.formats import MIX_PRESETS, PREFIX, AutoSpec

log = logging.getLogger(__name__)

#: ggml types a tensor may get (llama.cpp itself falls back on shapes a type cannot hold, e.g. Q4_K -> Q5_0)
CANDIDATES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
PROBE = "Q3_K"          # the type a category is lowered to when its KLD is measured
SAMPLE_ROWS = 256       # rows per tensor whose error is measured (evenly spaced)
CHECK_TOKENS = 2048     # calibration tokens for the mix-vs-preset check
CHECK_CTX = 512
ALIGN = 32              # GGUF default general.alignment
SEARCH_VERSION = 2      # 2: per-layer gains beside the per-category scales
LAYER_PROBES = 32       # at most this many layer probes (consecutive layers share one beyond)
PROBE_BATCH = 8         # probe files on disk (and scored together) at a time
FIT_ROUNDS = 10         # rounds of the category x layer fit
GAIN_FLOOR = 0.05       # a layer's gain is at least this x the median gain
PRESET_TRIES = 4        # presets quantised to find the comparator of an auto:BPW / auto:SIZE budget


# ------------------------------------------------------------------------------------------ sizes

def _align(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def tensor_bytes(path) -> tuple[dict[str, tuple[str, int]], int, int]:
    """``({tensor: (ggml type, bytes)}, header bytes, alignment)`` of a GGUF (header: file size minus the
    aligned tensor data)."""
    from quantkit.ggufio import read_gguf_header

    kv, tensors = read_gguf_header(path)
    align = int(kv.get("general.alignment") or ALIGN)
    out = {}
    for name, gtype, dims in tensors:
        qt, nbytes = _type_and_bytes(gtype, dims)
        out[name] = (qt.name, nbytes)
    data = sum(_align(b, align) for _, b in out.values())
    return out, Path(path).stat().st_size - data, align


def _type_and_bytes(gtype: int, dims) -> tuple:
    """``(gguf.GGMLQuantizationType, data bytes)`` of a tensor from its header entry."""
    import math

    import gguf

    from quantkit.formats import quant_size

    qt = gguf.GGMLQuantizationType(gtype)
    block, size = quant_size(qt)
    return qt, math.prod(dims) // block * size


# ------------------------------------------------------------------------------------ sensitivity

def _cache_dir() -> Path:
    from quantkit.util import cache_home

    return cache_home() / "mix"


@dataclass(frozen=True)
class _Tensor:
    """One tensor of a GGUF file as :func:`_weighted_error` reads it (the attributes of gguf-py's ReaderTensor
    it uses): ``data`` is a read-only memory map, rows x columns (F32/F16) or rows x bytes (other types)."""

    name: str
    tensor_type: object  # gguf.GGMLQuantizationType
    shape: tuple         # ne0 (columns) first, as GGUF stores it
    data: object


def read_tensors(path) -> dict[str, _Tensor]:
    """Every tensor of a GGUF as a memory-mapped array, from quantkit's header reader: gguf.GGUFReader parses
    the whole vocabulary first (seconds on a 50k-150k-token model, once per file read)."""
    import math

    import numpy as np

    from quantkit.ggufio import read_gguf_header

    _kv, tensors = read_gguf_header(path, offsets=True)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, gtype, dims, offset in tensors:
        qt, nbytes = _type_and_bytes(gtype, dims)
        raw = mm[offset:offset + nbytes]
        rows = math.prod(dims) // dims[0]
        if qt.name in ("F32", "F16"):
            data = raw.view(np.float32 if qt.name == "F32" else np.float16).reshape(rows, dims[0])
        else:
            data = raw.reshape(rows, -1)
        out[name] = _Tensor(name, qt, tuple(dims), data)
    return out


def _weighted_error(ref, qt, imx) -> float:
    """imatrix-weighted squared error of one tensor, estimated from a row sample (rows are independent)."""
    import numpy as np
    from gguf.quants import dequantize

    ref_t = ref.data
    cols = int(ref.shape[0])
    ref2 = np.asarray(ref_t).reshape(-1, cols)
    rows = ref2.shape[0]
    q_raw = np.asarray(qt.data)
    q_raw = q_raw.reshape(rows, -1)
    idx = np.unique(np.linspace(0, rows - 1, min(rows, SAMPLE_ROWS)).round().astype(np.int64))
    if ref.tensor_type.name in ("F32", "F16"):
        w = np.asarray(ref2[idx], dtype=np.float64)
    else:  # BF16 (or a quantised intermediate) is stored as bytes
        w = dequantize(np.asarray(ref2[idx]), ref.tensor_type).astype(np.float64)
    q = dequantize(np.ascontiguousarray(q_raw[idx]), qt.tensor_type).reshape(len(idx), cols).astype(np.float64)
    d2 = (w.reshape(len(idx), cols) - q) ** 2
    if imx is not None and imx.size % cols == 0:
        n_exp = imx.size // cols
        per_row = rows // n_exp if n_exp else rows
        weights = np.asarray(imx, dtype=np.float64).reshape(n_exp, cols)[np.minimum(idx // max(per_row, 1), n_exp - 1)]
    else:  # an embedding lookup: every row (token) equally likely
        weights = np.full((len(idx), cols), 1.0 / rows)
    return float((d2 * weights).sum() * rows / len(idx))


def category(name: str) -> str:
    """``blk.7.attn_v.weight`` -> ``attn_v``; ``output.weight`` -> ``output``."""
    return re.sub(r"^blk\.\d+\.", "", name).removesuffix(".weight")


def sensitivities(inter_path: Path, imatrix_path: Path, work: Path, *, key: dict, threads: int,
                  score=None) -> tuple[dict, str, bool]:
    """``(table, sha256 of the table, reused)``: per tensor, per candidate: actual type, bytes, error; with
    ``score`` (files -> mean KLDs on calibration text), per-category scales from measured KLD."""

    from quantkit.ggufio import load_imatrix, quantize_file
    from quantkit.util import atomic_path, sha256_bytes

    full_key = {**key, "candidates": list(CANDIDATES), "sample_rows": SAMPLE_ROWS, "search": SEARCH_VERSION,
                "probe": PROBE, "check_tokens": CHECK_TOKENS, "check_ctx": CHECK_CTX,
                "layer_probes": LAYER_PROBES, "fit_rounds": FIT_ROUNDS, "gain_floor": GAIN_FLOOR}
    kid = sha256_bytes(json.dumps(full_key, sort_keys=True).encode())[:24]
    cache = _cache_dir() / f"{kid}.json"
    if cache.is_file():
        blob = cache.read_bytes()
        return json.loads(blob), sha256_bytes(blob), True
    imx, _meta = load_imatrix(imatrix_path)
    ref = read_tensors(inter_path)
    table: dict[str, dict] = {}
    t0 = time.perf_counter()
    scratch = work / "mix"
    scratch.mkdir(parents=True, exist_ok=True)
    for cand in CANDIDATES:
        path = scratch / f"pure-{cand}.gguf"
        with atomic_path(path) as tmp:
            quantize_file(inter_path, tmp, "Q4_K_M", threads=threads, imatrix=imatrix_path, overrides={".*": cand})
        for t in read_tensors(path).values():  # one header read gives types, bytes and data
            typ, nbytes = t.tensor_type.name, int(t.data.nbytes)
            opts = table.setdefault(t.name, {})
            if typ in ("F32", "F16", "BF16") and typ == ref[t.name].tensor_type.name:
                opts[cand] = {"type": typ, "bytes": nbytes, "err": 0.0}
                continue
            opts[cand] = {"type": typ, "bytes": nbytes, "err": _weighted_error(ref[t.name], t, imx.get(t.name))}
        if cand != CANDIDATES[-1]:
            path.unlink()
        log.info("mix: measured %s (%.0f s so far)", cand, time.perf_counter() - t0)
    out = {"key": full_key, "tensors": table}
    if score is not None:
        out.update(_calibrate(table, inter_path, imatrix_path, scratch, score, threads))
    (scratch / f"pure-{CANDIDATES[-1]}.gguf").unlink()
    out["seconds"] = round(time.perf_counter() - t0, 1)
    blob = json.dumps(out, sort_keys=True).encode()
    cache.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(cache) as tmp:
        tmp.write_bytes(blob)
    return out, sha256_bytes(blob), False


def layer_of(name: str) -> int | None:
    """``blk.7.attn_v.weight`` -> 7; ``output.weight`` -> None."""
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def layer_bins(layers: list[int], n_bins: int = LAYER_PROBES) -> dict[int, int]:
    """``{layer: bin}``: consecutive layers share a probe when there are more than ``n_bins`` of them."""
    layers = sorted(set(layers))
    return {layer: i * n_bins // len(layers) for i, layer in enumerate(layers)}


def _calibrate(table: dict, inter_path: Path, imatrix_path: Path, scratch: Path, score, threads: int) -> dict:
    """Measured KLD per tensor category and per layer; ``{"categories": ..., "layers": ...}``.

    The proxy is in output-error units that do not compare across categories (an error in ``attn_q`` passes
    a softmax, one in ``ffn_down`` lands in the residual stream) nor across depth (an error in an early layer
    passes every later one: on the continuous SmolLM2 the same proxy costs ~30x more KLD in layer 0 than in the
    last layers). Two sets of probes, each file one group at :data:`PROBE` and the rest at the top candidate:
    one per category, one per layer (bins of consecutive layers beyond :data:`LAYER_PROBES`). The per-tensor
    factor ``scale(category) x gain(layer)`` is fitted to both sets of measured KLD increases (iterative
    proportional fitting: each category's and each layer's predicted increase equals its measured one). Costs
    one Q8_0-speed quantisation + one scoring per probe, :data:`PROBE_BATCH` files on disk at a time."""
    from quantkit.ggufio import quantize_file
    from quantkit.util import atomic_path

    top = CANDIDATES[-1]
    cats: dict[str, list[str]] = {}
    for n, opts in sorted(table.items()):
        if len({o["type"] for o in opts.values()}) > 1:
            cats.setdefault(category(n), []).append(n)
    varying = [n for names in cats.values() for n in names]
    bins = layer_bins([layer_of(n) for n in varying if layer_of(n) is not None])
    groups: dict[int, list[str]] = {}
    for n in varying:
        if layer_of(n) is not None:
            groups.setdefault(bins[layer_of(n)], []).append(n)
    if len(groups) < 2:  # one layer: its probe would repeat the category probes' sum
        groups = {}
    probes = [("category", c, names) for c, names in cats.items()]
    probes += [("layer", g, names) for g, names in sorted(groups.items())]
    base_kld = score([scratch / f"pure-{top}.gguf"])[0]
    klds = []
    for i in range(0, len(probes), PROBE_BATCH):
        files = []
        for kind, key, names in probes[i:i + PROBE_BATCH]:
            path = scratch / f"probe-{kind}-{key}.gguf"
            with atomic_path(path) as tmp:
                quantize_file(inter_path, tmp, "Q4_K_M", threads=threads, imatrix=imatrix_path,
                              overrides={**overrides({n: table[n][PROBE]["type"] for n in names}), ".*": top})
            files.append(path)
        klds += score(files)
        for f in files:
            f.unlink()
        log.info("mix: scored %d of %d probe files", len(klds), len(probes))
    proxy = {n: table[n][PROBE]["err"] - table[n][top]["err"] for n in varying}
    inc = {(kind, key): max(k - base_kld, 1e-9) for (kind, key, _), k in zip(probes, klds)}
    scale, gain = fit_scales(proxy, cats, groups, inc)
    out_c = {c: {"tensors": len(names), "kld": inc[("category", c)] + base_kld, "kld_increase": inc[("category", c)],
                 "proxy_increase": sum(proxy[n] for n in names), "scale": scale[c]} for c, names in cats.items()}
    out_l = {str(g): {"layers": sorted({layer_of(n) for n in names}), "tensors": len(names),
                      "kld_increase": inc[("layer", g)], "gain": gain[g]} for g, names in sorted(groups.items())}
    return {"categories": out_c, "layers": out_l, "base_kld": base_kld}


def fit_scales(proxy: dict[str, float], cats: dict[str, list[str]], groups: dict[int, list[str]],
               inc: dict[tuple, float]) -> tuple[dict[str, float], dict[int, float]]:
    """``(scale per category, gain per layer group)`` such that ``scale(category(n)) x gain(group(n)) x proxy[n]``
    summed over a probe's tensors is its measured KLD increase ``inc[("category", c)]`` / ``inc[("layer", g)]``
    (iterative proportional fitting; exact when the increases come from such a product). A gain is at least
    :data:`GAIN_FLOOR` x the median: a noisy near-zero probe does not make a layer free."""
    group_of = {n: g for g, names in groups.items() for n in names}
    scale = {c: 1.0 for c in cats}
    gain = {g: 1.0 for g in groups}
    for _ in range(FIT_ROUNDS):
        for c, names in cats.items():
            pred = sum(gain.get(group_of.get(n), 1.0) * proxy[n] for n in names)
            scale[c] = inc[("category", c)] / pred if pred > 0 else 1.0
        if gain:
            for g, names in groups.items():
                pred = sum(scale[category(n)] * proxy[n] for n in names)
                gain[g] = inc[("layer", g)] / pred if pred > 0 else 1.0
            floor = sorted(gain.values())[len(gain) // 2] * GAIN_FLOOR
            gain = {g: max(v, floor) for g, v in gain.items()}
    return scale, gain


def tensor_scales(table: dict) -> dict[str, float]:
    """Per tensor, the measured factor that puts its proxy into KLD units: category scale x layer gain."""
    cats = table.get("categories") or {}
    gains = {layer: v["gain"] for v in (table.get("layers") or {}).values() for layer in v["layers"]}
    return {n: (cats.get(category(n)) or {}).get("scale", 1.0) * gains.get(layer_of(n), 1.0)
            for n in table["tensors"]}


# -------------------------------------------------------------------------------------- allocation

def predicted_kld(table: dict, assign: dict[str, str]) -> float:
    """The search's predicted mean KLD of a file with these tensor types: its all-top-candidate probe's KLD plus
    each tensor's scaled proxy above the top candidate (tensors whose type the table lacks add nothing)."""
    top = CANDIDATES[-1]
    scales = tensor_scales(table)
    total = table["base_kld"]
    for n, opts in table["tensors"].items():
        by_type = {o["type"]: o["err"] for o in opts.values()}
        if assign.get(n) in by_type:
            total += (by_type[assign[n]] - opts[top]["err"]) * scales[n]
    return total


def pareto_options(table: dict, align: int = ALIGN) -> dict[str, list[tuple[int, float, str]]]:
    """Per tensor (sorted by name) its ``(aligned bytes, scaled error, ggml type)`` points, cheapest first, each
    with less error than the one before: one point per actual type (fallbacks repeat)."""
    scales = tensor_scales(table)
    out = {}
    for name, opts in sorted(table["tensors"].items()):
        pts = {o["type"]: (_align(o["bytes"], align), o["err"] * scales[name], o["type"]) for o in opts.values()}
        front = []
        for p in sorted(pts.values(), key=lambda p: (p[0], p[1])):
            if not front or p[1] < front[-1][1]:
                front.append(p)
        out[name] = front
    return out


def allocate(table: dict, budget: int, header: int, align: int = ALIGN) -> tuple[dict[str, str] | None, int]:
    """Greedy by error removed per byte under ``budget`` file bytes: ``({tensor: ggml type}, predicted size)``,
    ``(None, smallest size)`` when even the cheapest options do not fit."""
    hulls = {}
    for name, pts in pareto_options(table, align).items():
        hull = []
        for p in pts:  # the lower convex hull of the Pareto front
            while len(hull) >= 2 and ((hull[-1][1] - hull[-2][1]) * (p[0] - hull[-2][0])
                                      >= (p[1] - hull[-2][1]) * (hull[-1][0] - hull[-2][0])):
                hull.pop()
            hull.append(p)
        hulls[name] = hull
    choice = {n: 0 for n in hulls}
    size = header + sum(h[0][0] for h in hulls.values())
    if size > budget:
        return None, size
    steps = []
    for n, h in hulls.items():
        for i in range(1, len(h)):
            gain = (h[i - 1][1] - h[i][1]) / max(h[i][0] - h[i - 1][0], 1)
            steps.append((-gain, n, i))
    steps.sort()
    blocked = set()
    for _g, n, i in steps:
        if n in blocked or choice[n] != i - 1:
            blocked.add(n)
            continue
        extra = hulls[n][i][0] - hulls[n][i - 1][0]
        if size + extra > budget:
            blocked.add(n)
            continue
        size += extra
        choice[n] = i
    return {n: hulls[n][i][2] for n, i in choice.items()}, size


def _pure_bytes(table: dict, preset: str) -> int:
    """Tensor bytes of ``preset`` with every tensor at its base type (Q4_K_M -> Q4_K): a preset gives some
    tensors more bits, so its file is at least this."""
    base = re.sub(r"_[SML]$", "", preset)
    return sum(_align(opts[base]["bytes"]) for opts in table["tensors"].values())


def overrides(assign: dict[str, str]) -> dict[str, str]:
    """``{anchored regex: type}`` for llama.cpp's tensor overrides (it uses regex_search)."""
    return {f"^{re.escape(n)}$": t for n, t in sorted(assign.items())}


# ------------------------------------------------------------------------------------------ build

def _kld(base_path: Path, files: list[Path], text: str, threads, tokens: int = CHECK_TOKENS) -> list[float]:
    from quantkit.evaluate import evaluate

    rep = evaluate(str(base_path), [str(f) for f in files], text=text, ctx=CHECK_CTX, max_tokens=tokens,
                   write_manifest=False, threads=threads)
    return [float(r["kld_mean"]) for r in rep.rows]


def split_calibration(texts: list[str], count=None, need: int = CHECK_CTX) -> tuple[str, str, str]:
    """``(probe text, check text, label of the check's text)``: the probes are scored on the first half of the
    calibration samples, the mix-vs-preset check on the second half, so the check does not reward a mix for
    fitting the noise of the tokens the search measured (a search variant tried on the continuous SmolLM2 passed
    the check at Q5_K_M, 0.960, on its probes' own 2048 tokens and was 4-11% *worse* than the preset on held-out
    text). The probes' first tokens are the same as before the split, so cached tables stay valid. One sample,
    or a half shorter than ``need`` tokens (``count``: text -> tokens), is used for both, and the label says so."""
    half = len(texts) // 2
    whole = "\n\n".join(texts)
    first, second = "\n\n".join(texts[:half]), "\n\n".join(texts[half:])
    if half == 0 or (count is not None and min(count(first), count(second)) < need):
        return whole, whole, "calibration (the probes' own tokens: too little text to hold one back)"
    return first, second, "calibration, second half (not the probes' tokens)"


def build(spec: AutoSpec, dest: Path, *, src, inter_path: Path, imatrix_path: Path | None, imatrix_key: dict | None,
          calib, work: Path, threads: int, quantize_kwargs: dict, check: bool = True) -> tuple[dict, dict]:
    """Search the mix for ``spec`` and write it to ``dest``: ``(quantize_file's result, the mix record)``."""
    from quantkit.ggufio import converter_version, quantize_file
    from quantkit.util import atomic_path

    if imatrix_path is None or calib is None:
        raise QuantkitError(f"{spec.name} measures sensitivities on calibration text: pass --calibration FILE "
                            "(a text file, or 'builtin')")
    t0 = time.perf_counter()
    key = {"base_sha": src.sha, "intermediate": inter_path.name, "imatrix": imatrix_key,
           "llama_cpp": converter_version()}
    from quantkit.evaluate import base_tokenizer

    tok = base_tokenizer(src.path)
    probe_text, check_text, check_label = split_calibration(
        calib.texts, count=lambda t: len(tok(t, add_special_tokens=False).input_ids))
    key["calibration_sha256"] = calib.sha256

    def score(files):
        return _kld(src.path, files, probe_text, threads)

    key["measured"] = check
    table, table_sha, reused = sensitivities(inter_path, imatrix_path, work, key=key, threads=threads,
                                             score=score if check else None)
    sens_seconds = 0.0 if reused else time.perf_counter() - t0
    scratch = work / "mix"
    scratch.mkdir(parents=True, exist_ok=True)

    from quantkit.ggufio import read_gguf_info

    n_params = read_gguf_info(inter_path)["params"]
    ftype = spec.file_type(n_params)
    preset_path = None
    if spec.preset:
        preset_path = scratch / f"preset-{spec.preset}.gguf"
        with atomic_path(preset_path) as tmp:
            quantize_file(inter_path, tmp, spec.preset, threads=threads, **quantize_kwargs)
        budget = preset_path.stat().st_size
        ref_sizes, header, align = tensor_bytes(preset_path)
    else:
        # the comparator of a size budget: the largest K mix whose file fits it. Tried from the largest whose
        # tensors, all at its base type (from the sensitivity table: a lower bound of its size), fit, down;
        # none within PRESET_TRIES: no preset to fall back to, the mix stands alone
        budget = spec.size if spec.size is not None else int(spec.bpw * n_params / 8)
        header = align = None
        _, inter_header, _ = tensor_bytes(inter_path)  # ~ a quantised file's header (vocabulary, metadata)
        below = [p for p in MIX_PRESETS if inter_header + _pure_bytes(table, p) <= budget][::-1] or [MIX_PRESETS[0]]
        for name in below[:PRESET_TRIES]:
            probe = scratch / f"preset-{name}.gguf"
            with atomic_path(probe) as tmp:
                quantize_file(inter_path, tmp, name, threads=threads, **quantize_kwargs)
            if header is None:
                _, header, align = tensor_bytes(probe)
            if probe.stat().st_size <= budget:
                preset_path, ftype = probe, name
                break
            probe.unlink()
    assign, predicted = allocate(table, budget, header, align)
    if assign is None:
        raise QuantkitError(f"{spec.name}: no mix of {', '.join(CANDIDATES)} fits in {budget:,} bytes "
                            f"(the smallest is {predicted:,} bytes)")
    mix_tmp = scratch / f"mix-{spec.label}.gguf"
    with atomic_path(mix_tmp) as tmp:
        q = quantize_file(inter_path, tmp, ftype, threads=threads, overrides=overrides(assign), **quantize_kwargs)
    size = mix_tmp.stat().st_size
    measured = None
    fallback = None
    if size > budget:
        fallback = f"mix file {size:,} bytes > budget {budget:,}"
    elif preset_path is not None and check:
        kld_mix, kld_preset = _kld(src.path, [mix_tmp, preset_path], check_text, threads)
        measured = {"text": check_label, "tokens": CHECK_TOKENS, "ctx": CHECK_CTX, "preset": ftype,
                    "kld_mix": kld_mix, "kld_preset": kld_preset}
        if not kld_mix < kld_preset:
            fallback = f"mix KLD {kld_mix:.5f} >= {ftype}'s {kld_preset:.5f} on the calibration text"
    if fallback and preset_path is None:
        raise QuantkitError(f"{spec.name}: {fallback}")
    chosen = preset_path if fallback else mix_tmp
    chosen.replace(dest)
    for p in (preset_path, mix_tmp):
        if p is not None and p.exists():
            p.unlink()
    if fallback:
        log.warning("%s: falling back to %s (%s)", spec.name, ftype, fallback)
        q = {"seconds": q["seconds"], "imatrix_entries": q.get("imatrix_entries")}
    actual, _, _ = tensor_bytes(dest)
    record = {
        "spec": spec.name,
        "file_type": ftype,
        "preset": ftype if preset_path is not None else None,  # what the check compared with / fell back to
        "budget_bytes": budget,
        "predicted_bytes": predicted,
        "fallback": fallback,
        "tensor_types": {n: actual[n][0] for n in sorted(assign)},
        "sensitivity": {"sha256": table_sha, "reused": reused, "seconds": table.get("seconds"),
                        "key": table["key"],
                        "proxy": "imatrix-weighted squared error x measured KLD per category x per layer",
                        "categories": table.get("categories"), "layers": table.get("layers")},
        "search": {"candidates": list(CANDIDATES), "sample_rows": SAMPLE_ROWS, "allocation": "greedy error/byte",
                   "check": measured, "seconds": round(time.perf_counter() - t0, 1),
                   "sensitivity_seconds": round(sens_seconds, 1)},
    }
    return q, record


def summary(mix: dict) -> str:
    """One line for cards/tables: ``quantkit mix at Q4_K_M size: 120 Q4_K, 60 Q6_K, ...``."""
    from collections import Counter

    spec = mix.get("spec", "auto:?")[len(PREFIX):]
    if mix.get("fallback"):
        return f"quantkit mix at {spec} size: fell back to {mix.get('preset') or spec} ({mix['fallback']})"
    counts = Counter(mix.get("tensor_types", {}).values())
    parts = ", ".join(f"{n} {t}" for t, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"quantkit mix at {spec} size: {parts}"
