"""``quantkit card``: a model card (README.md) rendered from ``quantkit.json`` (+ the base model's card).

The card is Jinja2 templates under ``quantkit/templates/`` (``card.md.j2`` and its parts), filled from the
manifest: YAML metadata valid for huggingface_hub's ``ModelCard`` / ``ModelCardData`` (``base_model``,
``base_model_relation: quantized``, ``license`` (+ ``license_name`` / ``license_link``), ``tags``,
``pipeline_tag``, ``library_name``, ``quantized_by``), then a provided-files table with RAM/VRAM estimates,
a quality/speed table from the evaluation (or an honest "not measured"), how to run each format, the licence's
conditions, and the exact recipe, calibration and versions. The rendering is deterministic (no dates), so
re-pushing an unchanged folder uploads nothing.

The licence's family and rules come from :mod:`quantkit.licenses`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from quantkit import __version__
from quantkit.errors import QuantkitError
from quantkit.formats import GGUF_TYPES
from quantkit.licenses import LicenseInfo, check_license, license_info
from quantkit.manifest import Manifest
from quantkit.records import BenchScore, EvalScore, TaskScore, VerifyResult
from quantkit.report import bench_notes, bench_rows, gain
from quantkit.util import atomic_path, human_size
from quantkit.verify import unverified

TEMPLATES = Path(__file__).parent / "templates"
CARD_NAME = "README.md"
KV_CONTEXT = 4096  # context used for the RAM/VRAM estimates


def scrub_paths(obj):
    """Replace absolute local paths (a user's home, temp folders) by their last component, recursively.

    Cards and the published quantkit.json must not show where the publisher keeps files.
    """
    if isinstance(obj, dict):
        return {k: scrub_paths(v) for k, v in obj.items() if k not in ("local_path",)}
    if isinstance(obj, list):
        return [scrub_paths(v) for v in obj]
    if isinstance(obj, str) and "/" in obj:
        return _ABS_PATH.sub(lambda mt: mt.group(1), obj)
    return obj


# an absolute path of at least two components, alone or inside a string ("file:/home/me/notes.txt", a command line)
_ABS_PATH = re.compile(r"""(?:(?<=^)|(?<=[\s:=(\[,"']))/(?:[^/\s"']+/)+([^/\s"']+)/?""")


# -- sizes and estimates ----------------------------------------------------------------------------------------------

def _kv_dims(folder: Path, manifest: Manifest) -> dict | None:
    """n_layers, n_kv_heads, head_dim from a config.json (artifact folder, then base folder)."""
    candidates = [folder / "config.json"]
    if manifest.base.get("local_path"):
        candidates.append(Path(manifest.base["local_path"]) / "config.json")
    for c in candidates:
        try:
            cfg = json.loads(c.read_text())
        except (OSError, ValueError):
            continue
        cfg = cfg.get("text_config", cfg) if isinstance(cfg.get("text_config"), dict) else cfg
        try:
            heads = int(cfg["num_attention_heads"])
            head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
            return {"layers": int(cfg["num_hidden_layers"]), "kv_heads": int(cfg.get("num_key_value_heads") or heads),
                    "head_dim": head_dim}
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            continue
    return None


def _kv_dims_gguf(path: Path) -> dict | None:
    try:
        from gguf import GGUFReader

        r = GGUFReader(str(path))

        def kv(key):
            f = r.fields.get(key)
            return None if f is None else f.contents()

        arch = kv("general.architecture")
        layers = kv(f"{arch}.block_count")
        heads = kv(f"{arch}.attention.head_count")
        kv_heads = kv(f"{arch}.attention.head_count_kv") or heads
        head_dim = kv(f"{arch}.attention.key_length") or (kv(f"{arch}.embedding_length") // heads if heads else None)
        if isinstance(kv_heads, list):
            kv_heads = max(kv_heads)
        if layers and kv_heads and head_dim:
            return {"layers": int(layers), "kv_heads": int(kv_heads), "head_dim": int(head_dim)}
    except Exception:  # an unreadable header only costs the estimate
        return None
    return None


def memory_estimate(size: int, dims: dict | None, ctx: int = KV_CONTEXT) -> int:
    """Weights + f16 KV cache for ``ctx`` tokens + ~5% and 100 MB of runtime buffers (an estimate)."""
    kv = 2 * dims["layers"] * dims["kv_heads"] * dims["head_dim"] * ctx * 2 if dims else 0
    return int(size * 1.05 + kv + 100e6)


def _fmt_num(x, spec: str, dash: str = "—") -> str:
    if x is None:
        return dash
    try:
        return format(x, spec)
    except (TypeError, ValueError):
        return str(x)


# -- building the context ---------------------------------------------------------------------------------------------

FORMAT_TAGS = {"gguf": "gguf", "awq": "awq", "gptq": "gptq", "compressed-tensors": "compressed-tensors"}
FORMAT_TITLES = {"gguf": "GGUF", "awq": "AWQ", "gptq": "GPTQ", "compressed-tensors": "compressed-tensors"}


def _artifact_format(rec: dict) -> str:
    return (rec.get("format") or rec.get("method") or "").lower()


def _rows(folder: Path, manifest: Manifest, revision: str | None) -> list[dict]:
    rows = []
    dims_cfg = _kv_dims(folder, manifest)
    for name, rec in sorted(manifest.artifacts.items(), key=lambda kv: -(kv[1].get("size") or 0)):
        fmt = _artifact_format(rec)
        size = rec.get("size") or sum(f.get("size", 0) for f in rec.get("files") or [])
        path = rec.get("path") or name
        is_folder = fmt != "gguf" or path in (".", "") or (folder / path).is_dir()
        dims = dims_cfg
        if dims is None and fmt == "gguf" and (folder / path).is_file():
            dims = _kv_dims_gguf(folder / path)
        params = rec.get("params") or {}
        imatrix = bool(params.get("imatrix")) or bool(rec.get("calibration")) and fmt == "gguf"
        typ = rec.get("type") or params.get("type") or ""
        bits = rec.get("bits_per_weight") if fmt == "gguf" else rec.get("bits", params.get("bits"))
        group = rec.get("group_size", params.get("group_size"))
        if fmt == "gguf":
            method = "llama.cpp" + (" + imatrix" if imatrix else "")
            advice = GGUF_TYPES[typ.upper()].advice if typ.upper() in GGUF_TYPES else ""
            if rec.get("mix"):
                from quantkit.gguf_mix import summary

                advice = summary(rec["mix"])
        else:
            method = FORMAT_TITLES.get(fmt, fmt.upper()) + (f" ({rec['method']})" if rec.get("method") and
                                                            rec["method"].lower() != fmt else "")
            advice = {"awq": "GPU serving with vLLM / TGI / transformers",
                      "gptq": "GPU serving with vLLM / TGI / transformers",
                      "compressed-tensors": "GPU serving with vLLM; transformers with compressed-tensors"}.get(fmt, "")
        rows.append({
            "name": name, "path": path, "folder": is_folder, "format": fmt, "type": typ, "method": method,
            "bits": bits, "bits_shown": _fmt_num(bits, ".2f") if fmt == "gguf" else _fmt_num(bits, "d"),
            "group_size": group, "group_shown": _fmt_num(group, "d") if group not in (None, -1) else "—",
            "size": size, "size_shown": human_size(size) if size else "—",
            "mem_shown": human_size(memory_estimate(size, dims)) if size else "—",
            "mem_kind": "RAM" if fmt == "gguf" else "VRAM", "advice": advice, "revision": revision or "main",
            "params": scrub_paths(params), "calibration": scrub_paths(rec.get("calibration")),
            "tools": rec.get("tools") or {},
            "eval": EvalScore.from_json(rec.get("eval")), "bench": BenchScore.from_json(rec.get("bench")),
            "checked": checked_line(rec.get("verify")),
            "tasks": [TaskScore.from_json({"task": t, **d}) for t, d in sorted((rec.get("tasks") or {}).items())],
            "files": [{"path": f.get("path", "?"), "size": f.get("size", ""), "sha256": f.get("sha256", "")}
                      for f in rec.get("files") or [] if isinstance(f, dict)],
            "quant_method": rec.get("method") or fmt,
            # a split GGUF: one row for the set, fetched whole with `hf download --include`, loaded from shard 1
            "shards": len(rec.get("files") or []) if fmt == "gguf" else 1,
            "include": f"*-{typ}-*" if fmt == "gguf" else None,
        })
    return rows


def checked_line(verify: dict | None) -> str | None:
    """What the build's check says of a file, in words: which engine loaded it (the vLLM version that served
    it), its KLD to the base, and why it was not checked in vLLM on the machine that built it."""
    if not isinstance(verify, dict) or verify.get("skipped"):
        return None
    v = VerifyResult.from_json(verify)
    where = f"loaded in {v.engine}" if v.engine else "did not load"
    limits = f"bound {v.bound:g}" + (f", healthy up to {v.expected:g}" if v.expected is not None else "")
    what = (f"mean KLD {v.kld:.4f} to the base on {v.tokens} tokens ({limits})" if v.passed
            else f"FAILED: {v.problem()}")
    if v.high:
        what += f"; HIGH: {v.high_line()}"
    why = v.extra.get("vllm")
    return f"{where}: {what}" + (f"; {why}" if why else "")


def _quality(rows: list[dict], evaluation: dict) -> dict:
    measured = [r for r in rows if r["eval"] or r["bench"]]
    table = []
    for r in rows:
        e, b = r["eval"] or EvalScore(), r["bench"] or BenchScore()
        ratio = e.ppl_ratio
        if ratio is None and e.ppl and e.base_ppl:
            ratio = e.ppl / e.base_ppl
        peak = b.peak_memory
        table.append({
            "name": r["path"] if not r["folder"] else f"{r['type'] or r['format']} (folder)",
            "ppl": _fmt_num(e.ppl, ".4f"),
            "dppl": (f"{(ratio - 1) * 100:+.2f}%" if ratio is not None else "—")
            + (f" ± {e.ppl_ratio_se * 100:.2f}" if isinstance(e.ppl_ratio_se, (int, float)) else ""),
            "kld": _fmt_num(e.kld_mean, ".5f"), "kld_p99": _fmt_num(e.kld_p99, ".4f"),
            "top1": (f"{e.top1 * 100:.2f}%" if isinstance(e.top1, (int, float)) else "—"),
            "pp": _fmt_num(b.pp_tps, ".1f"), "tg": _fmt_num(b.tg_tps, ".1f"),
            "peak": human_size(peak) if isinstance(peak, (int, float)) else "—",
            "tg_gain": gain(b.tg_gain, "—"), "mem_gain": gain(b.memory_gain, "—"),
            "measured": bool(r["eval"] or r["bench"]),
        })
    scores = [r["bench"] for r in rows if r["bench"]]
    bases, refs = bench_rows(scores)
    base_rows = [{"name": f"{x.get('name')} ({x.get('label')})",
                  "pp": _fmt_num(x.get("pp_tps"), ".1f"), "tg": _fmt_num(x.get("tg_tps"), ".1f"),
                  "peak": human_size(x["peak_memory"]) if isinstance(x.get("peak_memory"), (int, float)) else "—",
                  "gain": "1.00x" if is_base else "—"}
                 for x, is_base in [(b, True) for b in bases] + [(b, False) for b in refs]]
    first_eval = next((r["eval"] for r in rows if r["eval"]), None) or EvalScore()
    first_bench = next((r["bench"] for r in rows if r["bench"]), None) or BenchScore()
    ev = {**{k: getattr(first_eval, k) for k in ("text", "text_sha256", "ctx", "tokens", "base_ppl")},
          **{k: v for k, v in (evaluation or {}).items() if v is not None}}
    hw = ev.get("hardware") or first_bench.hardware or {}
    hardware = None
    if isinstance(hw, dict) and hw:
        parts = [hw.get("cpu")]
        if hw.get("threads"):
            parts.append(f"{hw['threads']} threads")
        gpus = hw.get("gpus") or hw.get("gpu")
        if gpus:
            parts.append(", ".join(g.get("name", str(g)) if isinstance(g, dict) else str(g)
                                   for g in (gpus if isinstance(gpus, list) else [gpus])))
        hardware = "; ".join(str(p) for p in parts if p)
    elif isinstance(hw, str):
        hardware = hw
    text = ev.get("text")
    if isinstance(text, dict):
        text = text.get("name") or text.get("source") or json.dumps(text, sort_keys=True)
    tasks = [{"name": r["path"] if not r["folder"] else f"{r['type'] or r['format']} (folder)", "s": s}
             for r in rows for s in r["tasks"]]
    return {"any": bool(measured or tasks), "rows": table, "any_eval": any(r["eval"] for r in rows),
            "tasks": sorted(tasks, key=lambda t: t["s"].task), "lm_eval": tasks[0]["s"].lm_eval if tasks else None,
            "any_bench": any(r["bench"] for r in rows), "text": text,
            "text_sha256": (ev.get("text_sha256") or "")[:16] or None, "ctx": ev.get("ctx"),
            "tokens": ev.get("tokens"), "base_ppl": _fmt_num(ev.get("base_ppl"), ".4f", None),
            "hardware": hardware, "bench_notes": bench_notes(scores), "base_rows": base_rows,
            "unmeasured": [t["name"] for t in table if not t["measured"]],
            "checked": [{"name": r["path"] if not r["folder"] else f"{r['type'] or r['format']} (folder)",
                         "line": r["checked"]} for r in rows if r["checked"]]}


def _report(folder: Path, manifest: Manifest) -> dict | None:
    """The comparison report written next to the artifacts (by ``quantkit run``), if it is there."""
    rep = manifest.data.get("report")
    if not isinstance(rep, dict):
        return None
    out = {k: rep[k] for k in ("markdown", "image") if rep.get(k) and (folder / str(rep[k])).is_file()}
    return out or None


def _base_card_meta(manifest: Manifest) -> dict:
    lp = manifest.base.get("local_path")
    if not lp or not (Path(lp) / "README.md").is_file():
        return {}
    try:
        from huggingface_hub.repocard import metadata_load

        return metadata_load(Path(lp) / "README.md") or {}
    except Exception:  # a malformed base card must not stop ours
        return {}


def card_context(folder: str | os.PathLike, *, repo_id: str | None = None, revision: str | None = None,
                 quantized_by: str | None = None, license: str | None = None,
                 manifest: Manifest | None = None) -> dict:
    """Everything the templates need, from ``folder``'s manifest (no network)."""
    folder = Path(folder)
    m = manifest or Manifest.load(folder, create=False)
    if not m.artifacts:
        raise QuantkitError(f"{folder}/quantkit.json lists no artifacts: run `quantkit gguf|awq|gptq ... "
                            f"--out {folder}` first")
    base = {k: None for k in ("id", "revision", "sha", "license", "license_name", "license_link", "model_name",
                              "architecture", "model_type", "pipeline_tag", "code_files", "trust_remote_code")}
    base.update({k: v for k, v in m.base.items() if v is not None})
    base_meta = _base_card_meta(m)
    for k in ("license", "license_name", "license_link", "pipeline_tag"):
        if not base.get(k) and base_meta.get(k):
            base[k] = base_meta[k]
    lic = license_info(base, license)
    rows = _rows(folder, m, revision)
    formats = sorted({r["format"] for r in rows})
    model_name = base.get("model_name") or (base.get("id") or "model").split("/")[-1]
    fmt_title = " / ".join(FORMAT_TITLES.get(f, f) for f in formats)
    if repo_id is None:
        last = (m.data.get("pushes") or [{}])[-1].get("repo")
        repo_id = last or f"YOUR_NAME/{model_name}-{fmt_title.split(' ')[0].replace('/', '')}"
    types = []
    for r in rows:
        if r["type"] and r["type"] not in types:
            types.append(r["type"])
    tags = [FORMAT_TAGS.get(f, f) for f in formats] + ["quantkit", "quantized"]
    tags += [t for t in types if t not in tags]
    if any(r["format"] != "gguf" and r["bits"] for r in rows):
        tags += sorted({f"{r['bits']}-bit" for r in rows if r["format"] != "gguf" and r["bits"]})
    library = "gguf" if all(f.startswith("gguf") for f in formats) else "transformers"
    adapter, merged_from = m.base.get("adapter"), m.base.get("merged_from") or {}
    # a merged fine-tune quantises the fine-tune's repo; with a local adapter it is a fine-tune of the base
    relation_to = base.get("id") or (merged_from.get("id") if adapter else None)
    relation = ("quantized" if base.get("id") else "finetune") if relation_to else None
    if formats == ["gguf-lora"]:  # a GGUF LoRA adapter folder: an adapter for its base
        relation_to, relation = base.get("id"), "adapter" if base.get("id") else None
        tags.append("lora")
    meta = {
        "base_model": relation_to,
        "base_model_relation": relation,
        "license": lic.id or None,
        "license_name": lic.name if (lic.id or "").lower() == "other" else None,
        "license_link": lic.link if (lic.id or "").lower() == "other" else None,
        "language": base_meta.get("language") or None,
        "pipeline_tag": base.get("pipeline_tag") or "text-generation",
        "library_name": library,
        "tags": tags,
        "quantized_by": quantized_by or m.data.get("quantized_by") or "quantkit",
    }
    meta = {k: v for k, v in meta.items() if v is not None}
    tools: dict[str, str] = {}
    for r in rows:
        for k, v in (r["tools"] or {}).items():
            if v and k not in tools:
                tools[k] = v
    tools.setdefault("quantkit", m.data.get("quantkit_version") or __version__)
    calibrations = []
    for r in rows:
        c = r["calibration"]
        if c and c not in calibrations:
            calibrations.append(c)
    inter = m.data.get("intermediates") or {}
    imatrix = {"sha256": inter["imatrix"].get("sha256") or ""} if isinstance(inter.get("imatrix"), dict) else None
    gguf_rows = [r for r in rows if r["format"] == "gguf"]
    recommended = next((r for r in gguf_rows if r["type"].upper() == "Q4_K_M"), None) or \
        next((r for r in gguf_rows if r["type"].upper().startswith(("Q5", "Q4", "IQ4"))), None) or \
        (gguf_rows[0] if gguf_rows else None)
    return {
        "meta": meta, "base": base, "license": lic, "rows": rows, "formats": formats, "fmt_title": fmt_title,
        "model_name": model_name, "repo_id": repo_id, "revision": revision or "main",
        "quality": _quality(rows, m.data.get("evaluation") or {}), "tools": tools, "calibrations": calibrations,
        "imatrix": imatrix, "gguf_rows": gguf_rows, "hf_rows": [r for r in rows if r["format"] != "gguf"],
        "recommended": recommended, "kv_context": KV_CONTEXT, "quantkit_version": __version__,
        "adapter": adapter, "merged_from": merged_from,
        # a GGUF LoRA adapter folder (quantkit lora) has its own card: which bases it was measured on
        "template": "lora_card.md.j2" if formats == ["gguf-lora"] else "card.md.j2",
        "measured_on": [o for r in m.artifacts.values() for o in (r.get("measured_on") or {}).values()],
        "base_license": m.base.get("base_license"),
        "evaluation": m.data.get("evaluation") or {},
        "report": _report(folder, m),
        "unverified": scrub_paths(unverified(m)),
        "json": lambda obj: json.dumps(obj, indent=2, sort_keys=True, default=str),
    }


def _metadata_yaml(meta: dict) -> str:
    from huggingface_hub import ModelCardData

    return ModelCardData(**meta).to_yaml()


@dataclass
class RenderedCard:
    text: str
    metadata: dict
    license: LicenseInfo
    warnings: list[str]
    path: Path | None = None

    def to_json(self) -> dict:
        return {"path": str(self.path) if self.path else None, "metadata": self.metadata,
                "license": self.license.to_json(), "warnings": self.warnings, "bytes": len(self.text.encode())}


def render_card(folder: str | os.PathLike, *, repo_id: str | None = None, revision: str | None = None,
                quantized_by: str | None = None, license: str | None = None,
                manifest: Manifest | None = None) -> RenderedCard:
    """Render the card text for ``folder`` (nothing written)."""
    import jinja2

    ctx = card_context(folder, repo_id=repo_id, revision=revision, quantized_by=quantized_by, license=license,
                       manifest=manifest)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined,
                             autoescape=False, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    body = env.get_template(ctx["template"]).render(**ctx)
    text = "---\n" + _metadata_yaml(ctx["meta"]) + "\n---\n" + body.lstrip("\n")
    text = "\n".join(line.rstrip() for line in text.splitlines()) + "\n"
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    warnings = check_license(ctx["license"], repo_id if repo_id else None, public=False, accept_terms=False,
                             pushing=False)
    return RenderedCard(text=text, metadata=ctx["meta"], license=ctx["license"], warnings=warnings)


def write_card(folder: str | os.PathLike, *, repo_id: str | None = None, revision: str | None = None,
               quantized_by: str | None = None, license: str | None = None) -> RenderedCard:
    """``quantkit card OUTDIR``: write OUTDIR/README.md (atomically) and note it in the manifest's history."""
    folder = Path(folder)
    if not folder.is_dir():
        raise QuantkitError(f"{folder} is not a folder (give a quantkit output folder holding quantkit.json)")
    m = Manifest.load(folder, create=False)
    card = render_card(folder, repo_id=repo_id, revision=revision, quantized_by=quantized_by, license=license,
                       manifest=m)
    dest = folder / CARD_NAME
    if not dest.exists() or dest.read_text(errors="replace") != card.text:
        with atomic_path(dest) as tmp:
            tmp.write_text(card.text)
    card.path = dest
    m.log("card", path=CARD_NAME, license=card.license.id, warnings=len(card.warnings))
    m.save()
    return card
