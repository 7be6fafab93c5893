"""``quantkit run RECIPE``: pull -> quantise each variant -> eval (+bench) -> report -> card -> push.

Every stage is keyed by its inputs: the base commit SHA, the stage's parameters, the keys of the stages it
depends on, and the versions of the engines that do the work. Keys and outcomes go into the run log
``<out>/quantkit-run.json`` (and a line in each folder's ``quantkit.json`` history). A stage whose key matches a
finished record, and whose outputs are still on disk, is *cached*; anything else runs. So a re-run after a
crash redoes only the stage that was interrupted and what depends on it, and editing one variant redoes only
that variant.

Nothing is implemented twice: the stages call :func:`quantkit.gguf.quantize_gguf`,
:func:`quantkit.awq.quantize_awq`, :func:`quantkit.gptq.quantize_gptq`, :func:`quantkit.evaluate.evaluate`,
:func:`quantkit.bench.bench`, :func:`quantkit.card.write_card` and :func:`quantkit.publish.push`.

The stages are a table (:data:`STAGES`) run by one :meth:`Pipeline.run_stage` (key, cache, dry-run plan row,
run, run-log record, failure -> one line + traceback file); a new stage is a row plus the function that does
its work. Results are the typed records of :mod:`quantkit.records`; progress goes to ``logging``.

A variant that fails does not stop the others; the run ends with a table of every variant (done / cached /
failed / gate failed) and a non-zero exit when any variant failed or missed its gate. Only variants that
passed are pushed (``publish.only_passing``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import signal
import sys
import traceback
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

from quantkit import trust
from quantkit.errors import QuantkitError
from quantkit.manifest import Manifest
from quantkit.recipe import Recipe, Variant, load_recipe
from quantkit.records import GATES, BenchScore, EvalScore, PushResult, QuantResult, Record, TaskScores, VariantResult
from quantkit.util import dist_version, format_table, human_size, now_iso, save_json_merged

log = logging.getLogger(__name__)

RUN_LOG = "quantkit-run.json"
ENGINES = {
    "gguf": ("llama-cpp-python", "gguf"),
    "awq": ("gptqmodel", "llmcompressor", "compressed-tensors", "transformers", "torch"),
    "gptq": ("gptqmodel", "llmcompressor", "compressed-tensors", "transformers", "torch"),
    "eval": ("transformers", "torch", "llama-cpp-python"),
    "bench": ("transformers", "torch", "llama-cpp-python"),
    "tasks": ("lm_eval", "transformers", "torch", "llama-cpp-python"),
    "card": ("huggingface_hub",),
    "push": ("huggingface_hub",),
}
#: which stages a run does: all; only the variant stages (a cluster worker); only the folder stages (report, card,
#: push) after the workers, restoring every variant stage from the run log and never redoing one
PARTS = ("all", "variants", "folders")
#: set by a cluster task (quantkit.cluster) for its subprocess: the node named in the run log's "started" events
NODE_ENV = "QUANTKIT_NODE"
#: test hook: ``QUANTKIT_CRASH_AT=quantize:Q4_K_M`` kills the process (SIGKILL) when that stage starts
CRASH_ENV = "QUANTKIT_CRASH_AT"


def _key(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _engines(stage: str) -> dict:
    from quantkit import __version__
    from quantkit.vllm import installed_label

    # HF formats are checked, scored and benchmarked in vLLM where it runs them
    return {"quantkit": __version__, **{d: dist_version(d) for d in ENGINES[stage]},
            **({"vllm": installed_label()} if stage in ("awq", "gptq", "eval", "bench", "tasks") else {})}


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
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["variants"] = [v.to_json() for v in self.variants]
        d["exit_code"] = self.exit_code
        d["passed"] = self.exit_code == 0
        return d

    def table(self) -> str:
        if self.dry_run:
            rows = [(s["stage"], s["status"], s.get("key", "")[:12], s.get("detail", "")) for s in self.stages]
            return (f"dry run of {self.recipe} ({self.model} @ {(self.base_sha or 'unresolved')[:12]}), "
                    f"out {self.out}\n" + format_table(rows, ["stage", "status", "key", "detail"]))
        from quantkit.report import bench_rows, gain

        rows = []
        for v in self.variants:
            e = v.eval
            kld = f"{e.kld_mean:.5f}" if e and e.kld_mean is not None else ""
            dppl = f"{e.ppl_increase * 100:+.2f}%" if e and e.ppl_ratio is not None else ""
            top1 = f"{e.top1 * 100:.1f}%" if e and e.top1 is not None else ""
            tps = v.tokens_per_second
            b = v.bench
            rows.append((v.name, v.method, v.status, human_size(v.size) if v.size else "", kld, dppl, top1,
                         f"{tps:.1f}" if tps else "", gain(b and b.tg_gain, ""), gain(b and b.memory_gain, ""),
                         v.pushed or "", (v.error or "")[:90]))
        t = format_table(rows, ["variant", "method", "status", "size", "KLD", "dPPL", "top-1", "tok/s", "tg x",
                                "mem x", "pushed", "error"])
        lines = [t]
        for b in bench_rows([v.bench for v in self.variants])[0]:  # what "tg x" / "mem x" are relative to
            lines.append(f"x vs {b.get('name')} ({b.get('label')}{', cached' if b.get('cached') else ''}): "
                         f"{b.get('tg_tps') or 0:.1f} tok/s, peak mem "
                         f"{human_size(b['peak_memory']) if b.get('peak_memory') else '?'}")
        if self.report:
            lines.append(f"report: {self.report.get('markdown')} ({self.report.get('image')})")
        for e in self.errors:
            lines.append(f"error: {e}")
        bad = [v.name for v in self.variants if v.status in ("failed", "gate failed")]
        lines.append(f"{len(bad)} of {len(self.variants)} variant(s) failed or missed a gate: {', '.join(bad)}"
                     if bad else f"all {len(self.variants)} variant(s) passed")
        return "\n".join(lines)


# -- the stages ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stage:
    """One row of the stage table: how :meth:`Pipeline.run_stage` treats the stage."""

    name: str
    step: str | None = None  # the Pipeline method that runs it for one variant, in this order (None: per folder)
    record: type | None = None  # the record class of its result: kept in the run log, restored when cached
    field: str | None = None  # the VariantResult attribute that holds that result
    fails_variant: bool = True  # a failure fails its variants (a benchmark's is only reported)
    tracked: bool = True  # listed in the variant's ``stages``
    stamp: bool = False  # its key is stamped on the artifact in quantkit.json


STAGES = {s.name: s for s in (
    Stage("quantize", "quantize", stamp=True),
    Stage("eval", "evaluate", record=EvalScore, field="eval", stamp=True),
    Stage("tasks", "tasks", record=TaskScores, field="tasks", stamp=True),
    Stage("bench", "bench", record=BenchScore, field="bench", fails_variant=False),
    Stage("card", tracked=False),
    Stage("push", record=PushResult),
)}


@dataclass
class Done:
    """What a stage's work hands back to :meth:`Pipeline.run_stage`."""

    result: Record | None = None  # the stage's record (run log ``result``)
    reused: bool = False  # the engine found its output already built
    note: dict = field(default_factory=dict)  # more fields for the run log


def _quantize_gguf(src, v: Variant, cal, out: Path) -> bool:
    from quantkit.gguf import quantize_gguf

    r = quantize_gguf(src, [v.params["type"]], out, calibration=cal.spec if v.params.get("imatrix") else None,
                      outtype=v.params["outtype"], split_max_size=v.params.get("split_max_size"))
    return bool(r.reused)


def _quantize_hf(quantizer: Callable[[], Callable]) -> Callable[..., bool]:
    def run(src, v: Variant, cal, out: Path) -> bool:
        p = v.params
        extra = {k: p[k] for k in ("sym", "act_order", "damp", "engine") if k in p}
        if p.get("format"):
            extra["fmt"] = p["format"]
        r = quantizer()(src, bits=p["bits"], group_size=p["group_size"], calibration=cal.spec,
                        samples=cal.samples, seq_len=cal.seq_len, out=out, **extra)
        return bool(r.cached)

    return run


def _awq():
    from quantkit.awq import quantize_awq

    return quantize_awq


def _gptq():
    from quantkit.gptq import quantize_gptq

    return quantize_gptq


#: method -> quantise(the pulled source record, variant, calibration, out folder) -> whether the output was reused
#: (the record is the model resolved once by the pull stage, a merged fine-tune included: nothing resolves it again)
QUANTIZERS: dict[str, Callable[..., bool]] = {"gguf": _quantize_gguf, "awq": _quantize_hf(_awq),
                                             "gptq": _quantize_hf(_gptq)}


# -- the pipeline ----------------------------------------------------------------------------------------

class Pipeline:
    def __init__(self, recipe: Recipe, *, only=(), dry_run=False, push=True, part: str = "all"):
        if part not in PARTS:
            raise QuantkitError(f"part {part!r} is not one of {', '.join(PARTS)}")
        self.r = recipe
        self.part = part
        self.dry_run = dry_run
        self.push_enabled = push and recipe.publish.enabled
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

    # -- the one stage runner -------------------------------------------------------------------------
    def _look(self, stage: str, key: str, detail: str, outputs_ok: Callable[[], bool] = lambda: True) -> bool:
        """Record the stage's key and whether its output is cached under it; a dry run also gets its plan row."""
        self.keys[stage] = key
        rec = self.runlog.record(stage)
        cached = bool(rec and rec.get("key") == key and rec.get("status") == "done" and outputs_ok())
        if self.dry_run:
            self.plan_rows.append({"stage": stage, "status": "cached" if cached else "to do", "key": key,
                                   "detail": detail})
        return cached

    def run_stage(self, name: str, scope: str, key: str, detail: str, work: Callable[[], Done], *,
                  members: list[VariantResult], outputs_ok: Callable[[], bool] | None = None) -> tuple[str, Done]:
        """Run stage ``name`` for ``scope`` (a variant or a folder) under ``key``, as its row in :data:`STAGES`
        says: plan it (dry run), restore it (cached) or run ``work`` and record the outcome in the run log and
        on ``members``. A failure becomes one line (and a traceback file for an unexpected exception).
        Returns the state (planned | cached | done | failed) and what the work (or the cache) gave."""
        st = STAGES[name]
        stage = f"{name}:{scope}"
        rec = self.runlog.record(stage) or {}
        if outputs_ok is None:
            outputs_ok = (lambda: rec.get("result") is not None) if st.record else (lambda: True)
        cached = self._look(stage, key, detail, outputs_ok)
        if self.dry_run:
            return "planned", Done()
        if cached:
            self.runlog.event(stage, "cached", key)
            done = Done(result=st.record.from_json(rec["result"]) if st.record else None)
            self._settle(st, scope, key, members, "cached", done)
            return "cached", done
        if self.part == "folders" and st.step:  # a worker's stage that did not finish: report it, never redo it
            why = rec.get("error") if rec.get("status") == "failed" and rec.get("key") == key else "did not finish"
            work = _fails(f"not done on the cluster: {why}")
        else:
            log.info("[%s] running", stage)
            where = {"node": os.environ[NODE_ENV]} if NODE_ENV in os.environ else {}
            self.runlog.event(stage, "started", key, **where)
            if os.environ.get(CRASH_ENV) == stage:
                os.kill(os.getpid(), signal.SIGKILL)
        try:
            done = work()
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            if not isinstance(e, QuantkitError):
                msg = f"{type(e).__name__}: {msg}"
                (self.out / "logs").mkdir(parents=True, exist_ok=True)
                (self.out / "logs" / f"{stage.replace(':', '-')}.traceback.txt").write_text(traceback.format_exc())
            self.runlog.event(stage, "failed", key, error=msg)
            for r in members:
                if st.tracked:
                    r.stages[name] = "failed"
                if st.fails_variant and r.status != "failed":
                    r.status, r.error = "failed", f"{name}: {msg}"
            log.info("[%s] failed: %s", stage, msg)
            return "failed", Done()
        result = {"result": done.result.to_json()} if done.result is not None else {}
        self.runlog.event(stage, "reused" if done.reused else "done", key, **result, **done.note)
        self._settle(st, scope, key, members, "done", done)
        return "done", done

    def _settle(self, st: Stage, scope: str, key: str, members: list[VariantResult], state: str, done: Done):
        for r in members:
            if st.tracked:
                r.stages[st.name] = state
            if st.field:
                setattr(r, st.field, done.result)
        if st.stamp and state == "done":
            self._stamp(self._variant(scope), st.name, key)

    def _variant(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)

    def _stamp(self, v: Variant, stage: str, key: str) -> None:
        """Record a finished stage's key on the artifact in its folder's quantkit.json (and in its history)."""
        m = Manifest.load(self.out / v.folder)
        name = self.results[v.name].artifact
        if name in m.artifacts:
            m.artifacts[name].setdefault("recipe_stages", {})[stage] = key
        m.log(f"recipe.{stage}", variant=v.name, key=key, recipe=os.path.basename(self.r.path))
        m.save()

    # -- pull ------------------------------------------------------------------------------------------
    def pull(self) -> None:
        from quantkit.lora import resolve_source

        stage = "pull"
        keyed = {"adapter": self.r.adapter} if self.r.adapter else {}  # part of the key only when there is one
        if self.r.trust_remote_code:  # the model's own code may run: every key after this one says so
            trust.consent()
            keyed["trust_remote_code"] = True
        if self.r.model.startswith("builtin:"):
            from quantkit.demo import resolve_builtin

            folder = resolve_builtin(self.r.model)  # built once, then only looked up
            self.src = resolve_source(str(folder), adapter=self.r.adapter,
                                      adapter_revision=self.r.adapter_revision)
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
                                        sha=self.base_sha, **keyed)
            self.plan_rows.append({"stage": stage, "status": "cached" if rec and rec.get("sha") == self.base_sha
                                   and self.base_sha else "to do", "key": self.base_sha or "",
                                   "detail": f"{self.r.model}@{self.r.revision or 'main'}"
                                             + ("" if self.base_sha else " (not resolved: offline?)")})
            return
        else:
            self.src = resolve_source(self.r.model, self.r.revision, adapter=self.r.adapter,
                                      adapter_revision=self.r.adapter_revision)
        self.base_sha = self.src.sha  # a merged fine-tune's SHA covers base + adapter, so every key does too
        key = _key(stage=stage, model=self.r.model, revision=self.r.revision, sha=self.base_sha, **keyed)
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
            log.info("[plan] could not size the model (%s); continuing", e)
            return
        methods = {v.method for v in self.variants}
        imatrix = any(v.params.get("imatrix") for v in self.variants if v.method == "gguf")
        for m in sorted(methods):
            p.check_machine(m, out=self.out, imatrix=imatrix and m == "gguf",  # group sizes: before the download
                            group_sizes={v.params["group_size"] for v in self.variants if v.method == m != "gguf"})
        log.info("[plan] %.3gB parameters; this machine can do %s", p.params_total / 1e9, ", ".join(sorted(methods)))

    # -- quantise --------------------------------------------------------------------------------------
    def _quant_key(self, v: Variant) -> str:
        cal = None
        if v.method != "gguf" or v.params.get("imatrix"):
            c = self.r.calibration
            cal = {"spec": c.spec, "samples": c.samples, "seq_len": c.seq_len, "file": _file_sig(c.spec)}
        return _key(stage="quantize", base=self.base_sha, method=v.method, params=v.params, calibration=cal,
                    engines=_engines(v.method))

    def _artifact(self, v: Variant) -> tuple[str | None, QuantResult | None]:
        """The variant's artifact as its quantiser recorded it in the folder's quantkit.json (or None)."""
        folder = self.out / v.folder
        if not Manifest.exists(folder):
            return None, None
        m = Manifest.load(folder)
        if v.method == "gguf":
            names = [n for n, rec in m.artifacts.items() if rec.get("method") == "gguf" and rec.get("type") == v.name]
        else:
            names = [n for n, rec in m.artifacts.items() if rec.get("method") == v.method]
        name = names[0] if len(names) == 1 or (names and v.method == "gguf") else (names[-1] if names else None)
        return name, QuantResult.from_json(m.artifact(name)) if name else None

    def _artifact_ok(self, v: Variant) -> bool:
        name, art = self._artifact(v)
        if not art or not art.files:
            return False
        for f in art.files:  # sizes only: sha256 of a 40 GB file is the engines' job on a re-run
            p = self.out / v.folder / f["path"]
            if not p.is_file() or p.stat().st_size != f["size"]:
                return False
        res = self.results[v.name]
        res.artifact = name
        res.path = str(self.out / v.folder / (art.path or "."))
        res.size, res.bits_per_weight = art.size, art.bits_per_weight
        return True

    def _quantize(self, v: Variant) -> Done:
        folder = self.out / v.folder
        reused = QUANTIZERS[v.method](self.src, v, self.r.calibration, folder)
        if not self._artifact_ok(v):
            raise QuantkitError(f"{v.method} finished but {folder}/quantkit.json records no artifact for {v.name}")
        return Done(reused=reused, note={"artifact": self.results[v.name].artifact})

    def quantize(self, v: Variant) -> None:
        self.run_stage("quantize", v.name, self._quant_key(v),
                                  f"{v.method} {json.dumps(v.params, sort_keys=True)} -> {v.folder}/",
                                  lambda: self._quantize(v), members=[self.results[v.name]],
                                  outputs_ok=lambda: self._artifact_ok(v))

    # -- eval -------------------------------------------------------------------------------------------
    def _eval_key(self, v: Variant) -> str:
        e = self.r.eval
        return _key(stage="eval", quantize=self.keys.get(f"quantize:{v.name}"), base=self.base_sha, text=e.text,
                    text_file=_file_sig(e.text), ctx=e.ctx, max_tokens=e.max_tokens, engines=_engines("eval"))

    def _evaluate(self, v: Variant) -> Done:
        from quantkit.evaluate import evaluate

        e = self.r.eval
        rep = evaluate(self.src, [self.results[v.name].path], text=e.text, ctx=e.ctx,
                       max_tokens=e.max_tokens, engine=v.params.get("engine", "auto"),
                       **{g.name: getattr(e, g.name) for g in GATES})
        return Done(result=EvalScore.from_row(rep.rows[0], rep.context))

    def evaluate(self, v: Variant) -> None:
        e = self.r.eval
        if not e.enabled:
            return
        state, _ = self.run_stage("eval", v.name, self._eval_key(v),
                                  f"ctx {e.ctx}, {e.max_tokens} tokens of {e.text}", lambda: self._evaluate(v),
                                  members=[self.results[v.name]])
        if state in ("cached", "done"):
            self._gate(v)

    def _gate(self, v: Variant) -> None:
        res = self.results[v.name]
        for gate in GATES:
            limit, value = getattr(self.r.eval, gate.name), gate.value(res.eval)
            if limit is None or value is None:
                continue
            res.gates[gate.name] = gate.passes(value, limit)
            if not res.gates[gate.name]:
                res.status = "gate failed"
                res.error = res.error or f"{gate.name} {limit:g}: measured {value:.5g}"

    # -- tasks (lm-eval accuracy and recovery) -----------------------------------------------------------
    def _tasks(self, v: Variant) -> Done:
        from quantkit.tasks import eval_tasks

        e = self.r.eval
        rep = eval_tasks(self.src, [self.results[v.name].path], e.tasks, limit=e.limit,
                         num_fewshot=e.num_fewshot, cache_base=True,  # the base is scored once for all variants
                         engine=v.params.get("engine", "auto"), chat_template=e.chat_template)
        return Done(result=TaskScores.from_report(rep))

    def tasks(self, v: Variant) -> None:
        from quantkit.tasks import task_identity

        e = self.r.eval
        if not (e.enabled and e.tasks):
            return
        key = _key(stage="tasks", quantize=self.keys.get(f"quantize:{v.name}"), base=self.base_sha,
                   tasks=task_identity(e.tasks), limit=e.limit, num_fewshot=e.num_fewshot, engines=_engines("tasks"),
                   **({"chat_template": True} if e.chat_template else {}))
        state, _ = self.run_stage("tasks", v.name, key, f"{', '.join(e.tasks)} (limit {e.limit}, shots "
                                  f"{e.num_fewshot})", lambda: self._tasks(v), members=[self.results[v.name]])
        if state in ("cached", "done"):
            self._task_gate(v)

    def _task_gate(self, v: Variant) -> None:
        """``eval.min_recovery`` on every task (a gate of its own: GATES limit EvalScore values)."""
        from quantkit.tasks import RECOVERY_GATE as g

        res, limit = self.results[v.name], getattr(self.r.eval, g.name)
        if limit is None or res.tasks is None:
            return
        bad = [(t, s.recovery) for t, s in res.tasks.tasks.items()
               if s.recovery is None or not g.passes(s.recovery, limit)]
        res.gates[g.name] = not bad
        if bad:
            res.status = "gate failed"
            res.error = res.error or f"{g.name} {g.show_limit(limit)}: " + ", ".join(
                f"{t} {g.shown(r)}" for t, r in bad)

    # -- bench ------------------------------------------------------------------------------------------
    def _bench(self, v: Variant) -> Done:
        """The variant and its base in the same engine: for GGUF the folder's unquantised GGUF in llama.cpp, for
        HF formats the pulled base in transformers. bench() caches the base row (same base, engine, threads,
        token counts), so the base is measured once, not once per variant, and its record holds the gains."""
        from quantkit.bench import bench

        b, res = self.r.eval.bench, self.results[v.name]
        bench([res.path], prompt_tokens=b.prompt_tokens, gen_tokens=b.gen_tokens, repeats=b.repeats,
              threads=b.threads, base=None if v.method == "gguf" else str(self.src.path),
              engine=v.params.get("engine", "auto"))
        rec = (Manifest.load(self.out / v.folder).artifact(res.artifact) or {}).get("bench")
        if not rec:
            raise QuantkitError(f"bench recorded nothing for {res.artifact} in {v.folder}/quantkit.json")
        return Done(result=BenchScore.from_json(rec))  # as bench() wrote it into quantkit.json

    def bench(self, v: Variant) -> None:
        b = self.r.eval.bench
        if not (self.r.eval.enabled and b.enabled):
            return
        key = _key(stage="bench", quantize=self.keys.get(f"quantize:{v.name}"), params=vars(b),
                   base=self.base_sha, vs="base in the same engine", engines=_engines("bench"))
        self.run_stage("bench", v.name, key, f"{b.prompt_tokens} prompt + {b.gen_tokens} generated tokens, "
                       "and the base in the same engine", lambda: self._bench(v), members=[self.results[v.name]])

    # -- report, card, push -----------------------------------------------------------------------------
    def report(self) -> dict | None:
        from quantkit.report import REPORT_MD, REPORT_PNG, write_report

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

    def _members(self, folder: str) -> list[Variant]:
        return [v for v in self.variants if v.folder == folder]

    def _folder_ok_to_push(self, folder: str) -> tuple[list[VariantResult], list[VariantResult]]:
        members = [self.results[v.name] for v in self._members(folder)]
        good = [r for r in members if r.status not in ("failed", "gate failed") and r.artifact]
        bad = [r for r in members if r not in good]
        return good, bad

    def _repo(self, folder: str) -> str | None:
        """The Hub repo the folder goes to (None when this run does not push: the card then names none)."""
        return self._members(folder)[0].repo if self.push_enabled else None

    def _card_key(self, folder: str) -> str:
        f = self.out / folder
        m = Manifest.load(f) if Manifest.exists(f) else None
        return _key(stage="card", deps=[self.keys.get(s) for v in self._members(folder) for s in
                                        (f"quantize:{v.name}", f"eval:{v.name}", f"tasks:{v.name}",
                                         f"bench:{v.name}")],
                    report=((m.data.get("report") or {}).get("sha256") if m else None), repo=self._repo(folder),
                    license=self.r.publish.license, engines=_engines("card"))

    def _push_key(self, folder: str, card_key: str | None) -> str:
        p = self.r.publish
        return _key(stage="push", card=card_key, repo=self._members(folder)[0].repo, private=p.private,
                    license=p.license, accept_license_terms=p.accept_license_terms,
                    endpoint=os.environ.get("HF_ENDPOINT"), engines=_engines("push"))

    def _card(self, folder: str) -> Done:
        from quantkit.card import write_card

        write_card(self.out / folder, repo_id=self._repo(folder), license=self.r.publish.license)
        return Done()

    def card(self, folder: str) -> str | None:
        key = self._card_key(folder)
        members = self._members(folder)
        if not self.dry_run and not any(self.results[v.name].artifact for v in members):
            self._look(f"card:{folder}", key, f"{folder}/README.md")
            return None
        state, _ = self.run_stage("card", folder, key, f"{folder}/README.md", lambda: self._card(folder),
                                  members=[self.results[v.name] for v in members],
                                  outputs_ok=lambda: (self.out / folder / "README.md").is_file())
        return None if state == "failed" else key

    def _push(self, folder: str, repo: str) -> Done:
        from quantkit.publish import push

        p = self.r.publish
        out = push(self.out / folder, repo, private=p.private, license=p.license,
                   accept_license_terms=p.accept_license_terms)
        return Done(result=PushResult(repo=repo, url=out.url, commit=out.commit, revision=out.revision,
                                      pr_url=out.pr_url))

    def push(self, folder: str, card_key: str | None) -> None:
        repo = self._members(folder)[0].repo
        good, bad = self._folder_ok_to_push(folder)
        if not self.push_enabled:
            return
        if self.r.publish.only_passing and bad:
            why = ", ".join(f"{r.name} ({r.status})" for r in bad)
            log.info("[push:%s] not pushed: %s", folder, why)
            for r in good:
                r.stages["push"] = "skipped"
            return
        if not good or card_key is None:
            return
        state, _ = self.run_stage("push", folder, self._push_key(folder, card_key),
                                  f"-> {repo} ({'private' if self.r.publish.private else 'public'})",
                                  lambda: self._push(folder, repo), members=good)
        if state in ("cached", "done"):
            for r in good:
                r.pushed = repo

    # -- all of it ---------------------------------------------------------------------------------------
    def run(self) -> RunResult:
        self.out.mkdir(parents=True, exist_ok=True) if not self.dry_run else None
        if not self.dry_run:  # vLLM's server logs next to the run log
            os.environ.setdefault("QUANTKIT_VLLM_LOGS", str(self.out / "vllm-logs"))
        if not self.dry_run:
            self.runlog.data["runs"].append({"time": now_iso(), "recipe": self.r.path,
                                             "variants": [v.name for v in self.variants],
                                             **({"part": self.part} if self.part != "all" else {})})
            self.runlog.save()
        if not self.dry_run and not self.r.model.startswith("builtin:") and \
                not os.path.exists(os.path.expanduser(self.r.model)):
            self.check_machine() if self.part != "folders" else None  # before a big download
            self.pull()
        else:
            self.pull()
            if not self.dry_run and self.part != "folders":
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
            for st in STAGES.values():
                if st.step and self.results[v.name].status != "failed":
                    getattr(self, st.step)(v)
        for r in self.results.values():
            if r.status == "pending":
                r.status = "cached" if all(s == "cached" for s in r.stages.values()) and r.stages else "done"
        if self.part == "variants":
            res.stages = self.plan_rows
            return res
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


def _fails(msg: str) -> Callable[[], Done]:
    def work() -> Done:
        raise QuantkitError(msg)

    return work


def _file_sig(spec: str | None) -> dict | None:
    """Identity of a file named by a SPEC (size + sha256), so an edited calibration/eval file changes keys."""
    if not spec or spec == "builtin" or spec.startswith(("hub:", "builtin:")):
        return None
    p = Path(os.path.expanduser(spec))
    if not p.is_file():
        return None
    from quantkit.util import sha256_file

    return {"size": p.stat().st_size, "sha256": sha256_file(p)}


def run_recipe(path: str | os.PathLike, *, overrides=(), only=(), dry_run: bool = False, push: bool = True,
               progress: bool = False, part: str = "all") -> RunResult:
    """Run (or with ``dry_run`` only plan) the recipe at ``path``; see the module docstring.

    Progress goes to ``logging`` (INFO, logger ``quantkit.pipeline``); ``progress=True`` shows it on stderr
    when no logging handler is configured. ``part`` is one of :data:`PARTS`."""
    recipe = load_recipe(path, overrides=overrides)
    if not progress or log.hasHandlers():
        return Pipeline(recipe, only=only, dry_run=dry_run, push=push, part=part).run()
    handler, level = _StderrHandler(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        return Pipeline(recipe, only=only, dry_run=dry_run, push=push, part=part).run()
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


class _StderrHandler(logging.Handler):
    """Progress lines on whatever ``sys.stderr`` is at the time (INFO and up, the message only)."""

    def __init__(self):
        super().__init__(logging.INFO)

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr)
