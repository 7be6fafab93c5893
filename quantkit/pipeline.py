"""``quantkit run RECIPE``: pull -> quantise each variant -> eval (+bench) -> report -> card -> push.

Every stage is keyed by its inputs: the base commit SHA, the stage's parameters, the keys of the stages it
depends on, and the versions of the engines that do the work. Keys and outcomes go into the run log
``<out>/quantkit-run.json`` (and a line in each folder's ``quantkit.json`` history). A stage whose key matches a
finished record, and whose outputs are still on disk, is *cached*; anything else runs. So a re-run after a
crash redoes only the stage that was interrupted and what depends on it, and editing one variant redoes only
that variant.

Nothing is implemented twice: the stages call :func:`quantkit.gguf.quantize_gguf`,
:func:`quantkit.awq.quantize_awq`, :func:`quantkit.gptq.quantize_gptq`, :func:`quantkit.evaluate.evaluate`,
:func:`quantkit.bench.bench`, :func:`quantkit.card.write_card` and the Hub push in :mod:`quantkit.hub`.

A variant that fails does not stop the others; the run ends with a table of every variant (done / cached /
failed / gate failed) and a non-zero exit when any variant failed or missed its gate. Only variants that
passed are pushed (``publish.only_passing``).
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import os
import signal
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from quantkit.errors import QuantkitError
from quantkit.manifest import Manifest
from quantkit.recipe import Recipe, Variant, load_recipe
from quantkit.util import dist_version, format_table, human_size, now_iso, save_json_merged

RUN_LOG = "quantkit-run.json"
REPORT_MD = "quantkit-report.md"
REPORT_PNG = "quantkit-report.png"
ENGINES = {
    "gguf": ("llama-cpp-python", "gguf"),
    "awq": ("gptqmodel", "llmcompressor", "compressed-tensors", "transformers", "torch"),
    "gptq": ("gptqmodel", "llmcompressor", "compressed-tensors", "transformers", "torch"),
    "eval": ("transformers", "torch", "llama-cpp-python"),
    "bench": ("transformers", "torch", "llama-cpp-python"),
    "card": ("huggingface_hub",),
    "push": ("huggingface_hub",),
}
#: test hook: ``QUANTKIT_CRASH_AT=quantize:Q4_K_M`` kills the process (SIGKILL) when that stage starts
CRASH_ENV = "QUANTKIT_CRASH_AT"


def _key(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _engines(stage: str) -> dict:
    from quantkit import __version__

    return {"quantkit": __version__, **{d: dist_version(d) for d in ENGINES[stage]}}


def _call(fn: Callable, *args, **kwargs):
    """Call ``fn`` with the keyword arguments it accepts (the engines' signatures differ in optional extras)."""
    sig = inspect.signature(fn)
    if not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in sig.parameters}
    return fn(*args, **kwargs)


# -- run log -------------------------------------------------------------------------------------------

class RunLog:
    """``<out>/quantkit-run.json``: every stage's key and outcome, plus an append-only event list."""

    _PARTS = {"stages": {}, "events": [], "runs": []}

    def __init__(self, out: Path, readonly: bool = False):
        self.readonly = readonly
        self.path = out / RUN_LOG
        self.data = {"schema": 1, "stages": {}, "events": [], "runs": []}
        if self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text())
            except json.JSONDecodeError:
                pass  # a torn log only costs a re-run of the stages
            for k, v in self._PARTS.items():
                self.data.setdefault(k, copy.deepcopy(v))
        self._base = copy.deepcopy(self.data)  # saves merge against it: concurrent runs keep every event

    def record(self, stage: str) -> dict | None:
        return self.data["stages"].get(stage)

    def event(self, stage: str, event: str, key: str, **extra) -> None:
        self.data["events"].append({"stage": stage, "event": event, "key": key, "time": now_iso(), **extra})
        if event in ("done", "failed", "reused"):
            rec = {"key": key, "status": "failed" if event == "failed" else "done", "time": now_iso(), **extra}
            self.data["stages"][stage] = rec
        self.save()

    def save(self) -> None:
        """Write under the log's lock, merged with what other processes recorded meanwhile."""
        if not self.readonly:
            self._base = save_json_merged(self.path, self.data, self._base, defaults=self._PARTS)


# -- results ---------------------------------------------------------------------------------------------

@dataclass
class VariantResult:
    name: str
    method: str
    folder: str
    repo: str | None
    status: str = "pending"  # done | cached | failed | gate failed | skipped
    stages: dict = field(default_factory=dict)  # stage -> done | cached | failed | skipped
    error: str | None = None
    artifact: str | None = None
    path: str | None = None
    size: int | None = None
    bits_per_weight: float | None = None
    eval: dict | None = None
    bench: dict | None = None
    gates: dict = field(default_factory=dict)  # gate -> passed?
    pushed: str | None = None


@dataclass
class RunResult:
    recipe: str
    model: str
    out: str
    base_sha: str | None
    variants: list[VariantResult]
    dry_run: bool = False
    stages: list[dict] = field(default_factory=list)  # dry-run plan / folder stages
    report: dict | None = None
    pushes: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        if self.dry_run:
            return 0
        if self.errors or any(v.status in ("failed", "gate failed") for v in self.variants):
            return 1
        return 0

    def to_json(self) -> dict:
        from dataclasses import asdict

        d = asdict(self)
        d["exit_code"] = self.exit_code
        d["passed"] = self.exit_code == 0
        return d

    def table(self) -> str:
        if self.dry_run:
            rows = [(s["stage"], s["status"], s.get("key", "")[:12], s.get("detail", "")) for s in self.stages]
            return (f"dry run of {self.recipe} ({self.model} @ {(self.base_sha or 'unresolved')[:12]}), "
                    f"out {self.out}\n" + format_table(rows, ["stage", "status", "key", "detail"]))
        rows = []
        for v in self.variants:
            e = v.eval or {}
            kld = f"{e['kld_mean']:.5f}" if e.get("kld_mean") is not None else ""
            dppl = f"{(e['ppl_ratio'] - 1) * 100:+.2f}%" if e.get("ppl_ratio") is not None else ""
            top1 = f"{e['top1'] * 100:.1f}%" if e.get("top1") is not None else ""
            tps = _tps(v)
            rows.append((v.name, v.method, v.status, human_size(v.size) if v.size else "", kld, dppl, top1,
                         f"{tps:.1f}" if tps else "", v.pushed or "", (v.error or "")[:90]))
        t = format_table(rows, ["variant", "method", "status", "size", "KLD", "dPPL", "top-1", "tok/s", "pushed",
                                "error"])
        lines = [t]
        if self.report:
            lines.append(f"report: {self.report.get('markdown')} ({self.report.get('image')})")
        for e in self.errors:
            lines.append(f"error: {e}")
        bad = [v.name for v in self.variants if v.status in ("failed", "gate failed")]
        lines.append(f"{len(bad)} of {len(self.variants)} variant(s) failed or missed a gate: {', '.join(bad)}"
                     if bad else f"all {len(self.variants)} variant(s) passed")
        return "\n".join(lines)


def _tps(v: VariantResult) -> float | None:
    b = v.bench or {}
    for k in ("tg_tps", "tg_tokens_per_second", "gen_tokens_per_second", "tokens_per_second", "tg", "decode_tps"):
        if isinstance(b.get(k), (int, float)):
            return float(b[k])
    e = v.eval or {}
    return e.get("tokens_per_second")


# -- the pipeline ----------------------------------------------------------------------------------------

class Pipeline:
    def __init__(self, recipe: Recipe, *, only=(), dry_run=False, push=True, log: Callable | None = None):
        self.r = recipe
        self.dry_run = dry_run
        self.push_enabled = push and recipe.publish.enabled
        self.say = log or (lambda m: None)
        self.out = Path(recipe.out).expanduser()
        self.variants = self._select(only)
        self.runlog = RunLog(self.out, readonly=dry_run)
        self.src = None
        self.base_sha: str | None = None
        self.results = {v.name: VariantResult(v.name, v.method, v.folder, v.repo) for v in self.variants}
        self.keys: dict[str, str] = {}
        self.plan_rows: list[dict] = []

    def _select(self, only) -> list[Variant]:
        if not only:
            return list(self.r.variants)
        wanted = [o.strip() for item in only for o in str(item).split(",") if o.strip()]
        names = {v.name.upper(): v for v in self.r.variants}
        for w in wanted:
            if w.upper() not in names:
                raise QuantkitError(f"--only {w}: the recipe has no such variant; it has "
                                    f"{', '.join(self.r.variant_names())}")
        return [v for v in self.r.variants if v.name.upper() in {w.upper() for w in wanted}]

    # -- stage helper --------------------------------------------------------------------------------
    def _cached(self, stage: str, key: str, outputs_ok: Callable[[], bool] = lambda: True) -> bool:
        rec = self.runlog.record(stage)
        return bool(rec and rec.get("key") == key and rec.get("status") == "done" and outputs_ok())

    def _look(self, stage: str, key: str, detail: str, outputs_ok: Callable[[], bool] = lambda: True) -> bool:
        """Record the stage's key and whether its output is cached under it; a dry run also gets its plan row."""
        self.keys[stage] = key
        cached = self._cached(stage, key, outputs_ok)
        if self.dry_run:
            self.plan_rows.append({"stage": stage, "status": "cached" if cached else "to do", "key": key,
                                   "detail": detail})
        return cached

    def _start(self, stage: str, key: str) -> None:
        self.say(f"[{stage}] running")
        self.runlog.event(stage, "started", key)
        if os.environ.get(CRASH_ENV) == stage:
            os.kill(os.getpid(), signal.SIGKILL)

    # -- pull ------------------------------------------------------------------------------------------
    def _model_arg(self) -> tuple[str, str | None]:
        """What to hand the engines: a local folder, or the Hub id pinned to the resolved SHA."""
        if self.src.id and not self.r.model.startswith("builtin:") and not os.path.exists(self.r.model):
            return self.src.id, self.base_sha
        return str(self.src.path), None

    def pull(self) -> None:
        from quantkit.hub import resolve_model

        stage = "pull"
        if self.r.model.startswith("builtin:"):
            from quantkit.demo import resolve_builtin

            folder = resolve_builtin(self.r.model)  # built once, then only looked up
            self.src = resolve_model(str(folder))
        elif self.dry_run and not os.path.exists(os.path.expanduser(self.r.model)):
            rec = self.runlog.record(stage)
            self.base_sha = rec.get("sha") if rec else None
            try:
                from huggingface_hub import HfApi

                self.base_sha = HfApi().model_info(self.r.model, revision=self.r.revision).sha
            except Exception:
                pass
            if self.base_sha:
                self.keys[stage] = _key(stage=stage, model=self.r.model, revision=self.r.revision,
                                        sha=self.base_sha)
            self.plan_rows.append({"stage": stage, "status": "cached" if rec and rec.get("sha") == self.base_sha
                                   and self.base_sha else "to do", "key": self.base_sha or "",
                                   "detail": f"{self.r.model}@{self.r.revision or 'main'}"
                                             + ("" if self.base_sha else " (not resolved: offline?)")})
            return
        else:
            self.src = resolve_model(self.r.model, self.r.revision)
        self.base_sha = self.src.sha
        key = _key(stage=stage, model=self.r.model, revision=self.r.revision, sha=self.base_sha)
        cached = self._look(stage, key, f"{self.r.model} @ {self.base_sha[:12]}")
        if self.dry_run:
            return
        self.runlog.event(stage, "cached" if cached else "done", key, sha=self.base_sha, path=str(self.src.path))

    # -- plan check -----------------------------------------------------------------------------------
    def check_machine(self) -> None:
        from quantkit.plan import plan

        try:
            p = plan(str(self.src.path) if self.src else self.r.model, revision=None if self.src else self.r.revision,
                     context=self.r.eval.ctx)
        except QuantkitError as e:
            self.say(f"[plan] could not size the model ({e}); continuing")
            return
        methods = {v.method for v in self.variants}
        imatrix = any(v.params.get("imatrix") for v in self.variants if v.method == "gguf")
        for m in sorted(methods):
            p.check_machine(m, out=self.out, imatrix=imatrix and m == "gguf")
        self.say(f"[plan] {p.params_total / 1e9:.3g}B parameters; this machine can do "
                 f"{', '.join(sorted(methods))}")

    # -- quantise --------------------------------------------------------------------------------------
    def _quant_key(self, v: Variant) -> str:
        cal = None
        if v.method != "gguf" or v.params.get("imatrix"):
            c = self.r.calibration
            cal = {"spec": c.spec, "samples": c.samples, "seq_len": c.seq_len, "file": _file_sig(c.spec)}
        return _key(stage="quantize", base=self.base_sha, method=v.method, params=v.params, calibration=cal,
                    engines=_engines(v.method))

    def _artifact_ok(self, v: Variant) -> bool:
        res = self.results[v.name]
        folder = self.out / v.folder
        if not Manifest.exists(folder):
            return False
        m = Manifest.load(folder)
        name = self._artifact_name(v, m)
        rec = m.artifact(name) if name else None
        if not rec or not rec.get("files"):
            return False
        for f in rec["files"]:  # sizes only: sha256 of a 40 GB file is the engines' job on a re-run
            p = folder / f["path"]
            if not p.is_file() or p.stat().st_size != f["size"]:
                return False
        res.artifact = name
        return True

    def _artifact_name(self, v: Variant, m: Manifest) -> str | None:
        if v.method == "gguf":
            for name, rec in m.artifacts.items():
                if rec.get("method") == "gguf" and rec.get("type") == v.name:
                    return name
            return None
        names = [n for n, rec in m.artifacts.items() if rec.get("method") == v.method]
        return names[0] if len(names) == 1 else (names[-1] if names else None)

    def quantize(self, v: Variant) -> bool:
        stage = f"quantize:{v.name}"
        key = self._quant_key(v)
        res = self.results[v.name]
        cached = self._look(stage, key, f"{v.method} {json.dumps(v.params, sort_keys=True)} -> {v.folder}/",
                            lambda: self._artifact_ok(v))
        if self.dry_run:
            return True
        if cached:
            res.stages["quantize"] = "cached"
            self.runlog.event(stage, "cached", key)
            self._fill_artifact(v)
            return True
        self._start(stage, key)
        folder = self.out / v.folder
        model, revision = self._model_arg()
        c = self.r.calibration
        try:
            if v.method == "gguf":
                from quantkit.gguf import quantize_gguf

                r = _call(quantize_gguf, model, [v.params["type"]], folder, revision=revision,
                          calibration=c.spec if v.params.get("imatrix") else None, outtype=v.params["outtype"],
                          split_max_size=v.params.get("split_max_size"))
                reused = bool(getattr(r, "reused", None))
            else:
                mod = __import__(f"quantkit.{v.method}", fromlist=["x"])
                fn = getattr(mod, f"quantize_{v.method}")
                p = v.params
                extra = {k: p[k] for k in ("sym", "act_order", "damp") if k in p}
                if p.get("format"):
                    extra["fmt"] = p["format"]
                r = _call(fn, model, bits=p["bits"], group_size=p["group_size"], calibration=c.spec,
                          samples=c.samples, seq_len=c.seq_len, out=folder, revision=revision, **extra)
                reused = bool(getattr(r, "cached", False))
        except KeyboardInterrupt:
            raise
        except Exception as e:
            self._fail(v, stage, key, e)
            return False
        if not self._artifact_ok(v):
            self._fail(v, stage, key, QuantkitError(f"{v.method} finished but {folder}/quantkit.json records no "
                                                    f"artifact for {v.name}"))
            return False
        self.runlog.event(stage, "reused" if reused else "done", key, artifact=res.artifact)
        res.stages["quantize"] = "done"
        self._stamp(v, "quantize", key)
        self._fill_artifact(v)
        return True

    def _stamp(self, v: Variant, stage: str, key: str) -> None:
        """Record a finished stage's key on the artifact in its folder's quantkit.json (and in its history)."""
        m = Manifest.load(self.out / v.folder)
        name = self.results[v.name].artifact
        if name in m.artifacts:
            m.artifacts[name].setdefault("recipe_stages", {})[stage] = key
        m.log(f"recipe.{stage}", variant=v.name, key=key, recipe=os.path.basename(self.r.path))
        m.save()

    def _fill_artifact(self, v: Variant) -> None:
        res = self.results[v.name]
        m = Manifest.load(self.out / v.folder)
        res.artifact = res.artifact or self._artifact_name(v, m)
        rec = m.artifact(res.artifact) or {}
        res.path = str((self.out / v.folder / rec.get("path", ".")))
        res.size = rec.get("size")
        res.bits_per_weight = rec.get("bits_per_weight")

    def _fail(self, v: Variant, stage: str, key: str, e: Exception) -> None:
        res = self.results[v.name]
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not isinstance(e, QuantkitError):
            msg = f"{type(e).__name__}: {msg}"
            tb = traceback.format_exc()
            (self.out / "logs").mkdir(parents=True, exist_ok=True)
            (self.out / "logs" / f"{stage.replace(':', '-')}.traceback.txt").write_text(tb)
        res.status, res.error = "failed", f"{stage.split(':')[0]}: {msg}"
        res.stages[stage.split(":")[0]] = "failed"
        self.runlog.event(stage, "failed", key, error=msg)
        self.say(f"[{stage}] failed: {msg}")

    def _reuse(self, v: Variant, stage: str, key: str, field: str, detail: str) -> str | None:
        """Record the stage's key; in a dry run add its plan row ("planned"); when its result is cached under
        that key, restore it into the variant's result ("cached"); else None: the stage must run."""
        res = self.results[v.name]
        rec = self.runlog.record(stage)
        cached = self._look(stage, key, detail, lambda: rec.get("result") is not None)
        if self.dry_run:
            return "planned"
        if cached:
            setattr(res, field, rec["result"])
            res.stages[field] = "cached"
            self.runlog.event(stage, "cached", key)
            return "cached"
        return None

    # -- eval -------------------------------------------------------------------------------------------
    def _eval_key(self, v: Variant) -> str:
        e = self.r.eval
        return _key(stage="eval", quantize=self.keys.get(f"quantize:{v.name}"), base=self.base_sha, text=e.text,
                    text_file=_file_sig(e.text), ctx=e.ctx, max_tokens=e.max_tokens, engines=_engines("eval"))

    def evaluate(self, v: Variant) -> None:
        e = self.r.eval
        if not e.enabled:
            return
        stage = f"eval:{v.name}"
        key = self._eval_key(v)
        res = self.results[v.name]
        state = self._reuse(v, stage, key, "eval", f"ctx {e.ctx}, {e.max_tokens} tokens of {e.text}")
        if state == "planned":
            return
        if state is None:
            from quantkit.evaluate import evaluate

            self._start(stage, key)
            base = str(self.src.path)
            try:
                rep = _call(evaluate, base, [res.path], text=e.text, ctx=e.ctx, max_tokens=e.max_tokens,
                            max_kld=e.max_kld, max_ppl_increase=e.max_ppl_increase, min_top1=e.min_top1)
            except KeyboardInterrupt:
                raise
            except Exception as ex:
                self._fail(v, stage, key, ex)
                return
            row = rep.rows[0]
            keep = ("ppl", "base_ppl", "ppl_ratio", "delta_ppl", "ppl_ratio_se", "kld_mean", "kld_se", "kld_p99",
                    "top1", "tokens", "ctx", "engine", "tokenizer_match", "tokens_per_second", "size")
            res.eval = {k: row.get(k) for k in keep}
            res.stages["eval"] = "done"
            self.runlog.event(stage, "done", key, result=res.eval)
            self._stamp(v, "eval", key)
        self._gate(v)

    def _gate(self, v: Variant) -> None:
        res = self.results[v.name]
        e, ev = self.r.eval, res.eval or {}
        checks = {"max_kld": (e.max_kld, ev.get("kld_mean"), lambda x, lim: x <= lim),
                  "max_ppl_increase": (e.max_ppl_increase,
                                       None if ev.get("ppl_ratio") is None else ev["ppl_ratio"] - 1,
                                       lambda x, lim: x <= lim),
                  "min_top1": (e.min_top1, ev.get("top1"), lambda x, lim: x >= lim)}
        for gate, (limit, value, ok) in checks.items():
            if limit is None or value is None:
                continue
            res.gates[gate] = bool(ok(value, limit))
            if not res.gates[gate]:
                res.status = "gate failed"
                res.error = res.error or f"{gate} {limit:g}: measured {value:.5g}"

    # -- bench ------------------------------------------------------------------------------------------
    def bench(self, v: Variant) -> None:
        b = self.r.eval.bench
        if not (self.r.eval.enabled and b.enabled):
            return
        try:
            from quantkit.bench import bench as bench_fn
        except ImportError:
            self.say("[bench] quantkit.bench is not available; skipped")
            return
        stage = f"bench:{v.name}"
        key = _key(stage="bench", quantize=self.keys.get(f"quantize:{v.name}"), params=vars(b),
                   engines=_engines("bench"))
        res = self.results[v.name]
        if self._reuse(v, stage, key, "bench", f"{b.prompt_tokens} prompt + {b.gen_tokens} generated tokens"):
            return
        self._start(stage, key)
        try:
            r = _call(bench_fn, [res.path], prompt_tokens=b.prompt_tokens, gen_tokens=b.gen_tokens,
                      repeats=b.repeats, threads=b.threads, base=False)
        except KeyboardInterrupt:
            raise
        except Exception as ex:  # a failed benchmark is reported, it does not fail the variant
            msg = str(ex).splitlines()[0] if str(ex) else type(ex).__name__
            self.runlog.event(stage, "failed", key, error=msg)
            res.stages["bench"] = "failed"
            self.say(f"[{stage}] failed: {msg}")
            return
        res.bench = _bench_row(r)
        res.stages["bench"] = "done"
        self.runlog.event(stage, "done", key, result=res.bench)

    # -- report, card, push -----------------------------------------------------------------------------
    def report(self) -> dict | None:
        from quantkit.report import write_report

        done = [r for r in self.results.values() if r.eval]
        if not done or self.dry_run:
            return None
        rep = write_report(self.out, self.r, list(self.results.values()), base_sha=self.base_sha)
        # a copy next to each folder's artifacts, recorded for the card (links README -> report)
        for folder in {v.folder for v in self.variants}:
            f = self.out / folder
            if not Manifest.exists(f):
                continue
            rep_f = write_report(f, self.r, list(self.results.values()), base_sha=self.base_sha,
                                 link_prefix="")
            m = Manifest.load(f)
            m.data["report"] = {"markdown": REPORT_MD, "image": REPORT_PNG, "recipe": self.r.path,
                                "sha256": rep_f["sha256"], "time": now_iso()}
            m.save()
        return rep

    def _folder_ok_to_push(self, folder: str) -> tuple[list[VariantResult], list[VariantResult]]:
        members = [self.results[v.name] for v in self.variants if v.folder == folder]
        good = [r for r in members if r.status not in ("failed", "gate failed") and r.artifact]
        bad = [r for r in members if r not in good]
        return good, bad

    def card(self, folder: str) -> str | None:
        stage = f"card:{folder}"
        members = [v for v in self.variants if v.folder == folder]
        good, _ = self._folder_ok_to_push(folder)
        f = self.out / folder
        m = Manifest.load(f) if Manifest.exists(f) else None
        key = _key(stage="card", deps=[self.keys.get(s) for v in members for s in
                                       (f"quantize:{v.name}", f"eval:{v.name}", f"bench:{v.name}")],
                   report=((m.data.get("report") or {}).get("sha256") if m else None), engines=_engines("card"))
        cached = self._look(stage, key, f"{folder}/README.md", lambda: (f / "README.md").is_file())
        if self.dry_run:
            return key
        if not any(self.results[v.name].artifact for v in members):
            return None
        if cached:
            self.runlog.event(stage, "cached", key)
            return key
        try:
            from quantkit.card import write_card
        except ImportError:
            self.say("[card] quantkit.card is not available; skipped")
            return None
        self._start(stage, key)
        try:
            _call(write_card, f, repo_id=members[0].repo if self.push_enabled else None)
        except KeyboardInterrupt:
            raise
        except Exception as ex:
            msg = str(ex).splitlines()[0] if str(ex) else type(ex).__name__
            self.runlog.event(stage, "failed", key, error=msg)
            for v in members:
                r = self.results[v.name]
                if r.status not in ("failed",):
                    r.status, r.error = "failed", f"card: {msg}"
            return None
        self.runlog.event(stage, "done", key)
        return key

    def push(self, folder: str, card_key: str | None) -> None:
        members = [v for v in self.variants if v.folder == folder]
        repo = members[0].repo
        stage = f"push:{folder}"
        good, bad = self._folder_ok_to_push(folder)
        if not self.push_enabled:
            return
        if self.r.publish.only_passing and bad:
            why = ", ".join(f"{r.name} ({r.status})" for r in bad)
            self.say(f"[{stage}] not pushed: {why}")
            for r in good:
                r.stages["push"] = "skipped"
            return
        if not good or card_key is None:
            return
        key = _key(stage="push", card=card_key, repo=repo, private=self.r.publish.private,
                   endpoint=os.environ.get("HF_ENDPOINT"), engines=_engines("push"))
        cached = self._look(stage, key, f"-> {repo} ({'private' if self.r.publish.private else 'public'})")
        if self.dry_run:
            return
        if cached:
            self.runlog.event(stage, "cached", key)
            for r in good:
                r.pushed = repo
                r.stages["push"] = "cached"
            return
        push_fn = _push_function()
        if push_fn is None:
            self.say("[push] no push function in quantkit.hub yet; skipped")
            return
        self._start(stage, key)
        try:
            out = _call(push_fn, self.out / folder, repo, private=self.r.publish.private,
                        license=self.r.publish.license,
                        accept_license_terms=self.r.publish.accept_license_terms)
        except KeyboardInterrupt:
            raise
        except Exception as ex:
            msg = str(ex).splitlines()[0] if str(ex) else type(ex).__name__
            self.runlog.event(stage, "failed", key, error=msg)
            for r in good:
                r.status, r.error = "failed", f"push: {msg}"
                r.stages["push"] = "failed"
            return
        url = getattr(out, "url", None) or (out.get("url") if isinstance(out, dict) else None)
        self.runlog.event(stage, "done", key, repo=repo, url=url)
        for r in good:
            r.pushed = repo
            r.stages["push"] = "done"

    # -- all of it ---------------------------------------------------------------------------------------
    def run(self) -> RunResult:
        self.out.mkdir(parents=True, exist_ok=True) if not self.dry_run else None
        if not self.dry_run:
            self.runlog.data["runs"].append({"time": now_iso(), "recipe": self.r.path,
                                             "variants": [v.name for v in self.variants]})
            self.runlog.save()
        if not self.dry_run and not self.r.model.startswith("builtin:") and \
                not os.path.exists(os.path.expanduser(self.r.model)):
            self.check_machine()  # before a big download
            self.pull()
        else:
            self.pull()
            if not self.dry_run:
                self.check_machine()
        res = RunResult(recipe=self.r.path, model=self.r.model, out=str(self.out), base_sha=self.base_sha,
                        variants=[self.results[v.name] for v in self.variants], dry_run=self.dry_run)
        if self.dry_run and self.base_sha is None:
            # unresolved Hub model: every later stage is to do
            for v in self.variants:
                self.plan_rows.append({"stage": f"quantize:{v.name}", "status": "to do", "key": "",
                                       "detail": f"{v.method} -> {v.folder}/"})
            res.stages = self.plan_rows
            return res
        for v in self.variants:
            if self.quantize(v):
                self.evaluate(v)
                if self.results[v.name].status != "failed":
                    self.bench(v)
        for r in self.results.values():
            if r.status == "pending":
                r.status = "cached" if all(s == "cached" for s in r.stages.values()) and r.stages else "done"
        if not self.dry_run:
            try:
                res.report = self.report()
            except Exception as ex:  # the report is a summary: losing it must not lose the variants
                res.errors.append(f"report: {type(ex).__name__}: {ex}")
        for folder in dict.fromkeys(v.folder for v in self.variants):
            ck = self.card(folder)
            self.push(folder, ck)
        if not self.dry_run:
            for r in self.results.values():  # a push/card failure may have changed the status
                if r.status == "done" and r.stages and all(s == "cached" for s in r.stages.values()):
                    r.status = "cached"
        res.stages = self.plan_rows
        return res


def _file_sig(spec: str | None) -> dict | None:
    """Identity of a file named by a SPEC (size + sha256), so an edited calibration/eval file changes keys."""
    if not spec or spec == "builtin" or spec.startswith(("hub:", "builtin:")):
        return None
    p = Path(os.path.expanduser(spec))
    if not p.is_file():
        return None
    from quantkit.util import sha256_file

    return {"size": p.stat().st_size, "sha256": sha256_file(p)}


def _bench_row(r) -> dict:
    """Whatever bench() returns -> a small JSON-able dict of its first row."""
    for attr in ("rows", "results", "variants"):
        rows = getattr(r, attr, None) if not isinstance(r, dict) else r.get(attr)
        if rows:
            row = rows[0]
            return dict(row) if isinstance(row, dict) else dict(vars(row))
    if hasattr(r, "to_json"):
        d = r.to_json()
        for attr in ("rows", "results", "variants"):
            if d.get(attr):
                return d[attr][0]
        return d
    return r if isinstance(r, dict) else {"result": str(r)}


def _push_function():
    for modname in ("quantkit.publish", "quantkit.hub"):
        try:
            mod = __import__(modname, fromlist=["x"])
        except ImportError:
            continue
        for name in ("push", "push_folder"):
            fn = getattr(mod, name, None)
            if callable(fn):
                return fn
    return None


def run_recipe(path: str | os.PathLike, *, overrides=(), only=(), dry_run: bool = False, push: bool = True,
               log: Callable | None = None) -> RunResult:
    """Run (or with ``dry_run`` only plan) the recipe at ``path``; see the module docstring."""
    recipe = load_recipe(path, overrides=overrides)
    return Pipeline(recipe, only=only, dry_run=dry_run, push=push, log=log).run()
