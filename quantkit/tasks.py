"""``quantkit eval --tasks``: task accuracy of each variant and its **recovery** against the base, with
lm-evaluation-harness (``lm_eval``, the optional extra ``quantkit-llm[tasks]``).

How it works
------------
* Tasks are lm-eval's own: a registry name (``arc_easy``, ``hellaswag``...; datasets come from the Hub as
  lm-eval fetches them) or a path to a task YAML in lm-eval's format. A YAML's relative ``data_files`` are
  read relative to the YAML's folder, so a local ``dataset_path: json`` task works offline from anywhere.
* Each model is scored by the engine it will be served with (``task_lm`` of :mod:`quantkit.engines`), behind
  lm-eval's ``LM`` interface: HF formats in vLLM through lm-eval's own ``local-completions`` model, in
  transformers through lm-eval's own ``HFLM`` around the model quantkit loads; a GGUF through
  :class:`quantkit.engines.llama_cpp.GGUFLM`, which gets log-likelihoods from llama.cpp's kernels
  (``logits_all=True``), never a dequantised copy.
  Like ``quantkit eval`` without ``--tasks``, a GGUF is fed the **base tokenizer's ids** (lm-eval's own
  context/continuation split), so base and variant differ only in weights and kernels. Requests that share a
  prefix (the choices of one question) reuse llama.cpp's KV cache for it.
* Base and variants get the same lm-eval settings (limit, shots, few-shot seed, ``max_length``); the sha256
  of every task's request list is recorded per model and must be equal, or the run stops.
* Per task: the score of its main metric (``acc_norm``, else ``acc``, else ``exact_match``..., else the first
  one) ± lm-eval's standard error, and recovery = variant / base (base / variant for lower-is-better metrics
  such as perplexity). Its standard error comes from the paired per-document scores (delta method for a ratio
  of means: se = sd(num_i - r*den_i) / (sqrt(n) * mean(den))), so base against itself is exactly 1 ± 0;
  metrics that are not a mean of per-document values fall back to independent propagation of the two stderrs.
* Log-likelihood tasks (``multiple_choice``, ``loglikelihood``, ``loglikelihood_rolling``) and generation tasks
  (``generate_until``: exact match, GSM8K-style) run in every engine; generation is greedy, with the task's stop
  strings and ``max_gen_toks``. A task with several filters (GSM8K's ``strict-match`` and ``flexible-extract``)
  gives one row per filter (``own_gsm/strict-match``), each with its recovery.
"""

from __future__ import annotations

import difflib
import glob
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantkit import engines
from quantkit.engines import lm_eval_template
from quantkit.errors import QuantkitError
from quantkit.records import Gate, TaskScore
from quantkit.util import format_table, now_iso

log = logging.getLogger(__name__)

#: Which metric of a task is "the score", in order of preference (the figures publishers quote).
PRIMARY_METRICS = ("acc_norm", "acc", "exact_match", "mc2", "f1", "word_perplexity")
#: Longest token sequence given to any engine (lm-eval's ``max_length``); the same for base and variants.
DEFAULT_MAX_LENGTH = 2048
#: Bootstrap iterations for stderrs of metrics that are not plain means (lm-eval's default is 100,000).
BOOTSTRAP_ITERS = 1000
#: The task gate, a row like quantkit.records.GATES (whose rows limit EvalScore values): recovery >= limit.
RECOVERY_GATE = Gate("min_recovery", "recovery", "--min-recovery", "recovery", "task recovery", False, True,
                     lambda v: "n/a" if v is None else f"{v * 100:.1f}%")


# ------------------------------------------------------------------------------------------ tasks
def _first_line(e: BaseException) -> str:
    text = str(e).strip().strip("'\"")
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def load_task_yaml(path: Path) -> dict:
    """A task YAML (lm-eval's format, ``include``/``!function`` resolved) as a config dict whose relative
    ``data_files`` point into the YAML's folder."""
    import yaml
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        cfg = load_yaml(path, resolve_func=True, recursive=True)
    except (yaml.YAMLError, ValueError, OSError, ImportError, AttributeError) as e:
        raise QuantkitError(f"task YAML {path} is not valid: {_first_line(e)}") from None
    if not isinstance(cfg.get("task"), str):
        raise QuantkitError(f"task YAML {path} has no `task: NAME` (lm-eval's task format)")
    kwargs = cfg.get("dataset_kwargs") or {}
    files = kwargs.get("data_files")
    if files is not None:
        def fix(p):
            return p if ("://" in str(p) or os.path.isabs(str(p))) else str((path.parent / p).resolve())

        if isinstance(files, dict):
            files = {k: ([fix(p) for p in v] if isinstance(v, list) else fix(v)) for k, v in files.items()}
        elif isinstance(files, list):
            files = [fix(p) for p in files]
        else:
            files = fix(files)
        for one in _file_list(files):
            if "://" not in one and not glob.glob(one):
                raise QuantkitError(f"task YAML {path}: data file {one} does not exist")
        cfg["dataset_kwargs"] = {**kwargs, "data_files": files}
    return cfg


def _file_list(files) -> list[str]:
    """lm-eval's ``data_files`` (a path, a list, or a split -> path(s) dict) as one flat list."""
    return [f for v in (files.values() if isinstance(files, dict) else [files])
            for f in (v if isinstance(v, list) else [v])]


def _task_yaml(name: str) -> Path | None:
    """The task YAML a ``--tasks`` entry names (resolved), or None for an lm-eval registry name."""
    p = Path(os.path.expanduser(name))
    if not (name.endswith((".yaml", ".yml")) or p.is_file()):
        return None
    if not p.is_file():
        raise QuantkitError(f"task YAML {name} does not exist")
    return p.resolve()


def parse_tasks(tasks) -> list[str]:
    """``"arc_easy,my.yaml"`` or a list -> the task specs, in order, without repeats."""
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    out = []
    for t in tasks or []:
        t = str(t).strip()
        if t and t not in out:
            out.append(t)
    if not out:
        raise QuantkitError("--tasks is empty: give lm-eval task names or task YAML paths, comma-separated")
    return out


def task_identity(tasks) -> list[dict]:
    """What a task list's scores depend on, for cache keys: each registry name as given, each task YAML with the
    sha256 of the YAML and of its data files (an edited question changes the key)."""
    from quantkit.util import sha256_file

    out = []
    for name in parse_tasks(tasks):
        p = _task_yaml(name)
        if p is None:
            out.append({"task": name})
            continue
        files = _file_list((load_task_yaml(p).get("dataset_kwargs") or {}).get("data_files") or [])
        data = sorted(g for f in files if "://" not in f for g in glob.glob(f))
        out.append({"task": name, "yaml_sha256": sha256_file(p),
                    "data_sha256": {os.path.basename(f): sha256_file(f) for f in data}})
    return out


@dataclass
class TaskSet:
    """The specs handed to lm-eval (names or YAML configs) and the task manager that resolves them."""

    specs: list[Any]
    names: list[str]  # what the user gave, for messages
    manager: Any


def resolve_tasks(tasks) -> TaskSet:
    """Resolve registry names and YAML paths; every task is built once here, so a bad name, YAML or dataset
    stops before any model is loaded, with one line naming it. Log-likelihood and generation (``generate_until``)
    tasks both: every engine's adapter generates."""
    lm_eval_template()
    from lm_eval.tasks import TaskManager

    names = parse_tasks(tasks)
    specs: list[Any] = []
    need_registry = False
    for name in names:
        p = _task_yaml(name)
        if p is not None:
            specs.append(load_task_yaml(p))
        else:
            specs.append(name)
            need_registry = True
    # Scanning lm-eval's ~10k built-in task YAMLs takes seconds: only when a registry name was given.
    manager = TaskManager(include_defaults=need_registry)
    for name, spec in zip(names, specs):
        if isinstance(spec, str) and spec not in manager.all_tasks:
            close = difflib.get_close_matches(spec, manager.all_tasks, n=3)
            hint = f" (close: {', '.join(close)})" if close else ""
            raise QuantkitError(f"unknown task {spec!r}: not in lm-eval's task registry and not a task YAML "
                                f"file{hint}")
        try:
            manager.load([spec])
        except QuantkitError:
            raise
        except Exception as e:
            dataset = _dataset_of(manager, spec)
            if dataset and _needs_download(e):
                raise QuantkitError(
                    f"task {name} needs the dataset {dataset} from the Hub and could not get it "
                    f"({_first_line(e)}): fetch it where there is a network (it is kept in the datasets cache, "
                    f"HF_HOME), or copy its files here and point a task YAML at them (dataset_path: json, "
                    "data_files: ...; see examples/own-gsm/own_gsm.yaml)") from None
            raise QuantkitError(f"task {name} could not be loaded: {_first_line(e)}") from None
    return TaskSet(specs=specs, names=names, manager=manager)


def _dataset_of(manager, spec) -> str | None:
    """The Hub dataset a task reads (``dataset_path`` of its YAML; None for a local ``json``/``csv`` one)."""
    cfg = spec if isinstance(spec, dict) else getattr((manager.task_index or {}).get(spec), "cfg", None) or {}
    path = cfg.get("dataset_path")
    if not path or path in ("json", "csv", "text", "parquet", "arrow"):
        return None
    return path + (f" ({cfg['dataset_name']})" if cfg.get("dataset_name") else "")


def _needs_download(e: BaseException) -> bool:
    from quantkit.errors import is_network_error

    return is_network_error(e) or isinstance(e, ConnectionError) or "Couldn't reach" in str(e)


# ------------------------------------------------------------------------------------------ scores
def _primary_metric(result: dict) -> str:
    metrics = [k.split(",")[0] for k in result if "," in k and "_stderr" not in k]
    for m in PRIMARY_METRICS:
        if m in metrics:
            return m
    if not metrics:
        raise QuantkitError(f"lm-eval returned no metric ({sorted(result)})")
    return metrics[0]


def _num(x) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def doc_requests(samples: list[dict]) -> dict:
    """doc id -> its lm-eval request arguments (JSON), from the logged samples."""
    return {s["doc_id"]: json.dumps(s["arguments"], default=str) for s in samples}


def requests_sha256(requests: dict) -> str:
    """sha256 over every document's id and request arguments: equal means the same requests."""
    return hashlib.sha256(json.dumps(sorted(requests.items())).encode()).hexdigest()


def task_scores(results: dict) -> dict[str, dict]:
    """lm-eval's results -> ``{task: {metric, score, stderr, shots, n, higher_is_better, per_doc, requests,
    requests_sha256}}`` (``per_doc``: the metric per doc id when the score is their mean, else None)."""
    out = {}
    for task, res in results["results"].items():
        if task not in results.get("samples", {}):
            continue  # a group's aggregate row: its member tasks are listed themselves
        metric = _primary_metric(res)
        keys = [k for k in res if k.split(",")[0] == metric and "_stderr" not in k]
        hib = (results.get("higher_is_better", {}).get(task) or {}).get(metric)
        for key in keys:  # one row per filter when there are several (GSM8K: strict-match, flexible-extract)
            flt = key.split(",", 1)[1]
            samples = [s for s in results["samples"][task] if s.get("filter", flt) == flt]
            per_doc = {s["doc_id"]: _num(s.get(metric)) for s in samples}
            score = _num(res[key])
            if None in per_doc.values() or not per_doc or score is None or \
                    not math.isclose(sum(per_doc.values()) / len(per_doc), score, rel_tol=1e-9, abs_tol=1e-12):
                per_doc = None
            out[task if len(keys) == 1 else f"{task}/{flt}"] = {
                "metric": metric, "filter": flt, "score": score, "stderr": _num(res.get(f"{metric}_stderr,{flt}")),
                "shots": (results.get("n-shot") or {}).get(task), "n": len(samples),
                "higher_is_better": True if hib is None else bool(hib), "per_doc": per_doc,
                "requests": (reqs := doc_requests(samples)), "requests_sha256": requests_sha256(reqs)}
    return out


def recovery(base: dict, var: dict) -> tuple[float | None, float | None]:
    """variant / base (base / variant when lower is better) and its standard error (see the module docstring)."""
    num, den = (var, base) if base["higher_is_better"] else (base, var)
    if not den["score"]:
        return None, None
    r = num["score"] / den["score"]
    if base["per_doc"] is not None and var["per_doc"] is not None and base["per_doc"].keys() == var["per_doc"].keys():
        ids = sorted(base["per_doc"])
        n = len(ids)
        if n < 2:
            return r, None
        d = [num["per_doc"][i] - r * den["per_doc"][i] for i in ids]
        mean_d = sum(d) / n
        sd = math.sqrt(sum((x - mean_d) ** 2 for x in d) / (n - 1))
        return r, sd / (math.sqrt(n) * den["score"])
    if base["stderr"] is None or var["stderr"] is None or not num["score"]:
        return r, None
    return r, abs(r) * math.sqrt((num["stderr"] / num["score"]) ** 2 + (den["stderr"] / den["score"]) ** 2)


# ------------------------------------------------------------------------------------------ report
@dataclass
class TaskReport:
    base: dict  # name, path, engine, tasks: {task: score record}
    context: dict
    rows: list[dict]  # one per variant and task
    gates: dict = field(default_factory=dict)
    failed: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        base = {**self.base, "tasks": {t: _public(s) for t, s in self.base["tasks"].items()}}
        return {"base": base, "context": self.context, "tasks": self.rows, "gates": self.gates,
                "failed": self.failed, "passed": not self.failed}

    def failure_line(self) -> str:
        from quantkit.evaluate import gate_failure_line

        return gate_failure_line(self.failed, {RECOVERY_GATE.key: RECOVERY_GATE})

    def table(self) -> str:
        bad = {(f["variant"], f["task"]) for f in self.failed}
        rows = []
        for r in self.rows:
            ts = TaskScore.from_row(r, self.context, self.base)
            rows.append([r["task"], r["metric"], r["shots"], r["n"], r["variant"], r["engine_short"], ts.base_shown,
                         ts.score_shown, ts.recovery_shown + (" !" if (r["variant"], r["task"]) in bad else "")])
        headers = ["task", "metric", "shots", "docs", "variant", "engine", "base", "variant score", "recovery"]
        c = self.context
        lines = [f"tasks: {', '.join(c['tasks'])}; limit {c['limit']}; base {self.base['name']} "
                 f"({self.base['engine']}); lm-eval {c['lm_eval']}", "", format_table(rows, headers)]
        if self.gates:
            lines += ["", f"gates: {RECOVERY_GATE.flag} {self.gates[RECOVERY_GATE.key]['shown']}: "
                      + ("all passed" if not self.failed else f"{len(self.failed)} failed (cells marked !)")]
        return "\n".join(lines)


def _public(score: dict) -> dict:
    return {k: v for k, v in score.items() if k not in ("per_doc", "requests")}


def _run_tasks(lm, taskset: TaskSet, limit, num_fewshot, chat_template: bool = False) -> tuple[dict, float]:
    import lm_eval

    t0 = time.perf_counter()
    try:
        res = lm_eval.simple_evaluate(model=lm, tasks=list(taskset.specs), task_manager=taskset.manager,
                                      num_fewshot=num_fewshot, limit=limit, log_samples=True,
                                      bootstrap_iters=BOOTSTRAP_ITERS, apply_chat_template=chat_template)
    except QuantkitError:
        raise
    except Exception as e:
        raise QuantkitError(f"lm-eval failed on {lm.engine.split(' (')[0]}: {_first_line(e)}") from None
    return task_scores(res), time.perf_counter() - t0


def _base_cache_file(base_sha: str, tasks, limit, num_fewshot, max_length: int, batch_size: int,
                     engine: str = "transformers", chat_template: bool = False) -> Path:
    """Where the base's scores for these settings are kept: keyed by the base's SHA, the tasks (YAML and data
    sha256), limit, shots, max_length, batch size and the engine versions."""
    from quantkit.util import cache_home, dist_version

    key = hashlib.sha256(json.dumps({
        "base": base_sha, "tasks": task_identity(tasks), "limit": limit, "num_fewshot": num_fewshot,
        "max_length": max_length, "batch_size": batch_size, **({"chat_template": True} if chat_template else {}),
        "engines": {d: dist_version(d) for d in ("lm_eval", "transformers", "torch")},
        **({"engine": engines.get(engine).version()} if engine != "transformers" else {})},
        sort_keys=True).encode()).hexdigest()[:24]
    folder = cache_home() / "tasks"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{key}.json"


def _read_base_cache(path: Path | None):
    """(scores, seconds, engine, max_length) from a base cache file, or None (missing or torn)."""
    if path is None or not path.is_file():
        return None
    try:
        d = json.loads(path.read_text())
        scores = d["scores"]
        for s in scores.values():  # JSON made the doc ids strings
            for k in ("per_doc", "requests"):
                if s.get(k) is not None:
                    s[k] = {int(i) if str(i).lstrip("-").isdigit() else i: v for i, v in s[k].items()}
        return scores, d["seconds"], d["engine"], d["max_length"]
    except (json.JSONDecodeError, KeyError, AttributeError, TypeError):
        return None


def eval_tasks(base: str, variants: list[str], tasks, *, limit: int | float | None = None,
               num_fewshot: int | None = None, min_recovery=None, max_length: int = DEFAULT_MAX_LENGTH,
               batch_size: int = 1, threads: int | None = None, write_manifest: bool = True,
               cache_base: bool = False, engine: str = "auto", chat_template: bool = False) -> TaskReport:
    """Score ``base`` and every variant on ``tasks`` with lm-eval; see the module docstring. ``cache_base``: keep
    the base's scores under quantkit's cache (:func:`_base_cache_file`), so scoring N variants one at a time
    scores the base once. ``engine``: how HF-format variants run (:func:`quantkit.engines.choose`); when
    every variant is served by vLLM, the base is served by the same vLLM. ``chat_template``: every prompt goes
    through the base tokenizer's chat template (lm-eval's ``apply_chat_template``), for the base and every
    variant alike (the request hashes say so)."""
    from quantkit.evaluate import assign_engines, base_tokenizer, parse_fraction, resolve_variants, unique_names
    from quantkit.hub import resolve_model
    from quantkit.util import dist_version

    if not variants:
        raise QuantkitError("give at least one VARIANT to evaluate against the base")
    if limit is not None and limit <= 0:
        raise QuantkitError(f"--limit {limit} must be positive")
    if num_fewshot is not None and num_fewshot < 0:
        raise QuantkitError(f"--num-fewshot {num_fewshot} must not be negative")
    g = RECOVERY_GATE
    mr = parse_fraction(min_recovery, g.flag)
    gates = {} if mr is None else {g.key: {"limit": mr, "shown": g.show_limit(mr)}}
    resolved = unique_names([v for spec in variants for v in resolve_variants(spec)])
    ref = assign_engines(resolved, engine)
    for v in resolved:  # one base, in one engine: with a GGUF in the run, HF formats stay with transformers
        if v.engine == "vllm" and ref != "vllm":
            v.engine = "transformers"
    taskset = resolve_tasks(tasks)
    src = resolve_model(base)
    tok = base_tokenizer(src.path)

    cache = (_base_cache_file(src.sha, tasks, limit, num_fewshot, max_length, batch_size, ref, chat_template)
             if cache_base else None)
    hit = _read_base_cache(cache)
    if hit:
        base_scores, base_s, base_engine, max_length = hit
        log.info("[tasks] base scores of %s from the cache (%s)", src.name, cache)
    else:
        from quantkit.vllm import model_max_len

        # never beyond the base's trained context, and the same for every engine
        max_length = min(max_length, model_max_len(src.path) or max_length)
        base_lm = engines.get(ref).task_lm(src.path, base_tokenizer=tok, base_path=src.path, max_length=max_length,
                                           threads=threads, batch_size=batch_size)
        base_lm._max_length = max_length
        base_scores, base_s = _run_tasks(base_lm, taskset, limit, num_fewshot, chat_template)
        base_engine = base_lm.engine
        del base_lm
        if cache:
            from quantkit.util import atomic_path

            with atomic_path(cache) as tmp:
                tmp.write_text(json.dumps({"scores": base_scores, "seconds": base_s, "engine": base_engine,
                                           "max_length": max_length}))
    rows: list[dict] = []
    failed: list[dict] = []
    for v in resolved:
        lm = engines.get(v.engine).task_lm(v.path, base_tokenizer=tok, base_path=src.path, max_length=max_length,
                                           threads=threads, batch_size=batch_size)
        scores, secs = _run_tasks(lm, taskset, limit, num_fewshot, chat_template)
        engine = lm.engine
        if hasattr(lm, "close"):
            lm.close()
        del lm
        for task, b in base_scores.items():
            s = scores.get(task)
            if s is None:
                continue
            if s["requests_sha256"] != b["requests_sha256"]:
                doc = next((d for d in sorted(b["requests"]) if b["requests"][d] != s["requests"].get(d)), None)
                raise QuantkitError(f"{v.name}: lm-eval built different requests for {task} than for the base "
                                    f"({len(s['requests'])} vs {len(b['requests'])} documents; first difference "
                                    f"at {doc}: {str(s['requests'].get(doc))[:200]!r} vs "
                                    f"{str(b['requests'].get(doc))[:200]!r})")
            rec, rec_se = recovery(b, s)
            row = {"variant": v.name, "artifact": v.artifact, "format": v.format, "type": v.type, "task": task,
                   "metric": s["metric"], "shots": s["shots"], "n": s["n"], "score": s["score"],
                   "stderr": s["stderr"], "base_score": b["score"], "base_stderr": b["stderr"],
                   "recovery": rec, "recovery_se": rec_se, "higher_is_better": s["higher_is_better"],
                   "requests_sha256": s["requests_sha256"], "engine": engine,
                   "engine_short": engines.get(v.engine).short,
                   "seconds": round(secs, 2), "gates": {}}
            if g.key in gates:
                floor = gates[g.key]["limit"]
                row["gates"][g.key] = ok = rec is not None and g.passes(rec, floor)
                if not ok:
                    failed.append({"variant": v.name, "task": task, "gate": g.key, "value": rec, "limit": floor,
                                   "shown": f"{g.shown(rec)} ({task})", "limit_shown": gates[g.key]["shown"]})
            rows.append(row)
    context = {"tasks": taskset.names, "task_names": list(base_scores), "limit": limit, "num_fewshot": num_fewshot,
               "chat_template": chat_template, "max_length": max_length, "lm_eval": dist_version("lm_eval"),
               "time": now_iso()}
    report = TaskReport(base={"name": src.name, "id": src.id, "sha": src.sha, "path": str(src.path),
                              "engine": base_engine, "seconds": round(base_s, 2), "tasks": base_scores,
                              "cached": bool(hit)},
                        context=context, rows=rows, gates=gates, failed=failed)
    if write_manifest:
        _write_manifests(report, resolved)
    return report


def _write_manifests(report: TaskReport, resolved) -> None:
    """``artifacts[name].tasks[task]`` in each variant's quantkit.json (other tasks already there are kept)."""
    from quantkit.manifest import Manifest

    by_dir: dict[Path, list] = {}
    for v in resolved:
        if v.manifest_dir and v.artifact:
            by_dir.setdefault(v.manifest_dir, []).append(v)
    c = report.context
    for folder, vs in by_dir.items():
        m = Manifest.load(folder, create=False)
        for v in vs:
            if v.artifact not in m.artifacts:
                continue
            tasks = dict(m.artifacts[v.artifact].get("tasks") or {})
            for r in report.rows:
                if r["variant"] == v.name:
                    tasks[r["task"]] = TaskScore.from_row(r, c, report.base).to_json()
            m.update_artifact(v.artifact, tasks=tasks)
        m.log("tasks", variants=[v.artifact for v in vs], tasks=c["task_names"], passed=not report.failed)
        m.save()
