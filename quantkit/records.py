"""Typed records of what each stage produces, and the quality gates.

A stage's result is a dataclass here, built in one place from what the stage measured and read back with
``from_json`` wherever it is used: ``quantkit.json``'s ``artifacts[name].eval`` / ``.bench`` / ``.verify``, the
run log ``quantkit-run.json``, the report and the card. ``to_json()`` / ``from_json()`` sit next to the fields;
keys a record does not know (written by a newer quantkit, or added by another stage) are kept in ``extra`` and
written back unchanged, so a read-modify-write never loses them.

This module imports nothing from the pipeline, the report or the card (they all import it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable


class Record:
    """Base of every record: the dataclass fields, then ``extra`` (unknown keys, round-tripped as they were)."""

    extra: dict

    def to_json(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**d, **self.extra}

    @classmethod
    def from_json(cls, d: dict | None):
        """The record from its JSON form; None (or an empty/non-dict value) gives None."""
        if not isinstance(d, dict) or not d:
            return None
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in d.items() if k in names},
                   extra={k: v for k, v in d.items() if k not in names})


@dataclass
class QuantResult(Record):
    """One artifact as its quantiser recorded it in ``quantkit.json`` (``artifacts[name]``): the quantise stage's
    result, whatever the method. GGUF rows carry ``type``, HF rows ``bits``/``group_size``/``format``."""

    method: str | None = None
    path: str | None = None
    size: int | None = None
    bits_per_weight: float | None = None
    files: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)


@dataclass
class EvalScore(Record):
    """``quantkit eval``'s score of one variant against its base (``artifacts[name].eval``)."""

    ppl: float | None = None
    base_ppl: float | None = None
    ppl_ratio: float | None = None
    delta_ppl: float | None = None
    ppl_ratio_se: float | None = None
    kld_mean: float | None = None
    kld_se: float | None = None
    kld_p99: float | None = None
    top1: float | None = None
    tokens: int | None = None
    windows: int | None = None
    ctx: int | None = None
    text: str | None = None
    text_sha256: str | None = None
    engine: str | None = None
    tokenizer_match: bool | None = None
    tokens_per_second: float | None = None
    size: int | None = None
    gates: dict | None = None  # gate key -> passed, as evaluate() checked them
    time: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def ppl_increase(self) -> float | None:
        return None if self.ppl_ratio is None else self.ppl_ratio - 1

    @classmethod
    def from_row(cls, row: dict, context: dict) -> "EvalScore":
        """From one of ``evaluate()``'s variant rows and its context (the one place the keys are mapped)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "text", "text_sha256", "gates", "time"}
        return cls(**{k: row.get(k) for k in names}, text=context.get("text"),
                   text_sha256=context.get("text_sha256"), gates=row.get("gates") or None, time=context.get("time"))


@dataclass
class BenchScore(Record):
    """``quantkit bench``'s measurement of one variant (``artifacts[name].bench``); ``base`` is the base's row
    measured in the same run (None when no base was measured)."""

    engine: str | None = None
    device: str | None = None
    prompt_tokens: int | None = None
    gen_tokens: int | None = None
    repeats: int | None = None
    threads: int | None = None
    pp_tps: float | None = None
    pp_tps_std: float | None = None
    tg_tps: float | None = None
    tg_tps_std: float | None = None
    size: int | None = None
    bits_per_weight: float | None = None
    peak_memory: int | None = None  # bytes the engine holds for the model + KV cache (see peak_memory_method)
    peak_memory_method: str | None = None
    memory_breakdown: dict | None = None
    peak_rss: int | None = None  # the whole process's peak RSS, for reference
    peak_gpu_memory: int | None = None
    pp_gain: float | None = None
    tg_gain: float | None = None
    size_gain: float | None = None
    memory_gain: float | None = None
    ttft_s: float | None = None  # vLLM: time to first token of one request (seconds)
    concurrency: int | None = None  # vLLM: requests at once for tg_tps_concurrent
    tg_tps_concurrent: float | None = None  # vLLM: generated tok/s of all those requests together
    tg_concurrent_gain: float | None = None
    base: dict | None = None  # the base measured in the same engine (gains are relative to it)
    reference: dict | None = None  # optional "what you would run otherwise" row (no gains against it)
    load_avg_1m: float | None = None
    warnings: list = field(default_factory=list)
    hardware: dict | None = None
    time: str | None = None
    extra: dict = field(default_factory=dict)

    #: what a base/reference row keeps (bench.py measures it; the card and report show it)
    BASE_FIELDS = ("name", "label", "role", "engine", "device", "path", "pp_tps", "pp_tps_std", "tg_tps",
                   "tg_tps_std", "size", "bits_per_weight", "peak_memory", "peak_memory_method", "measured_at",
                   "measurement_id", "cached", "load_avg_1m", "ttft_s", "concurrency", "tg_tps_concurrent")
    #: (gain key, row key, lower is better)
    GAINS = (("pp_gain", "pp_tps", False), ("tg_gain", "tg_tps", False), ("size_gain", "size", True),
             ("memory_gain", "peak_memory", True), ("tg_concurrent_gain", "tg_tps_concurrent", False))

    @classmethod
    def from_row(cls, row: dict, context: dict, base: dict | None, reference: dict | None = None,
                 warnings: list | None = None) -> "BenchScore":
        """From one of ``bench()``'s variant rows, its context, the base row (same engine) and the optional
        reference row: the one place those keys are mapped."""
        c = context

        def keep(b):
            return {k: b.get(k) for k in cls.BASE_FIELDS} if b else None

        return cls(engine=row["engine"], device=row["device"], prompt_tokens=c["prompt_tokens"],
                   gen_tokens=c["gen_tokens"], repeats=c["repeats"], threads=c["threads"], pp_tps=row["pp_tps"],
                   pp_tps_std=row["pp_tps_std"], tg_tps=row["tg_tps"], tg_tps_std=row["tg_tps_std"],
                   size=row["size"], bits_per_weight=row["bits_per_weight"], peak_memory=row["peak_memory"],
                   peak_memory_method=row.get("peak_memory_method"), memory_breakdown=row.get("memory_breakdown"),
                   peak_rss=row.get("peak_rss"), peak_gpu_memory=row.get("peak_gpu_memory"),
                   ttft_s=row.get("ttft_s"), concurrency=row.get("concurrency"),
                   tg_tps_concurrent=row.get("tg_tps_concurrent"), **{g: row.get(g) for g, _, _ in cls.GAINS},
                   base=keep(base), reference=keep(reference),
                   load_avg_1m=c.get("load_avg_1m"),
                   warnings=[w for w in (warnings or []) if w.startswith(tuple(
                       f"{r['name']}:" for r in (row, base) if r))],  # the variant's and its base's
                   hardware=c["hardware"], time=c["time"])


@dataclass
class TaskScore(Record):
    """One lm-eval task's score of one variant and its recovery against the base (``artifacts[name].tasks[task]``;
    :func:`quantkit.tasks.eval_tasks` measures it)."""

    task: str | None = None
    metric: str | None = None
    shots: int | None = None
    n: int | None = None
    score: float | None = None
    stderr: float | None = None
    base_score: float | None = None
    base_stderr: float | None = None
    recovery: float | None = None
    recovery_se: float | None = None
    higher_is_better: bool = True
    requests_sha256: str | None = None
    engine: str | None = None
    gates: dict = field(default_factory=dict)
    limit: float | None = None
    max_length: int | None = None
    lm_eval: str | None = None
    base: dict | None = None  # the base's id and commit SHA
    time: str | None = None
    extra: dict = field(default_factory=dict)

    ROW_FIELDS = ("task", "metric", "shots", "n", "score", "stderr", "base_score", "base_stderr", "recovery",
                  "recovery_se", "higher_is_better", "requests_sha256", "engine", "gates")

    @classmethod
    def from_row(cls, row: dict, context: dict, base: dict) -> "TaskScore":
        """From one of ``eval_tasks()``'s rows, its context and base (the one place those keys are mapped)."""
        return cls(**{k: row[k] for k in cls.ROW_FIELDS}, limit=context["limit"], max_length=context["max_length"],
                   lm_eval=context["lm_eval"], base={"id": base.get("id"), "sha": base.get("sha")},
                   time=context["time"])

    def _shown(self, score: float | None, se: float | None) -> str:
        if score is None:
            return "n/a"
        if self.higher_is_better and abs(score) <= 1:
            return f"{score * 100:.1f}%" + (f" ± {se * 100:.1f}" if se is not None else "")
        return f"{score:.4g}" + (f" ± {se:.2g}" if se is not None else "")

    @property
    def score_shown(self) -> str:
        """``61.0% ± 2.1`` (a fraction metric) or ``12.3 ± 0.4`` (e.g. a perplexity)."""
        return self._shown(self.score, self.stderr)

    @property
    def base_shown(self) -> str:
        return self._shown(self.base_score, self.base_stderr)

    @property
    def recovery_shown(self) -> str:
        if self.recovery is None:
            return "n/a"
        return f"{self.recovery * 100:.1f}%" + (f" ± {self.recovery_se * 100:.1f}" if self.recovery_se is not None
                                                 else "")


@dataclass
class TaskScores(Record):
    """The tasks stage's result for one variant: task -> :class:`TaskScore` (and whether the base's scores
    came from the cache)."""

    tasks: dict = field(default_factory=dict)
    base_cached: bool | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_report(cls, report) -> "TaskScores":
        """From an ``eval_tasks()`` report of one variant."""
        return cls(tasks={r["task"]: TaskScore.from_row(r, report.context, report.base) for r in report.rows},
                   base_cached=report.base.get("cached"))

    def to_json(self) -> dict:
        return {**super().to_json(), "tasks": {t: s.to_json() for t, s in self.tasks.items()}}

    @classmethod
    def from_json(cls, d: dict | None):
        out = super().from_json(d)
        if out is not None:
            out.tasks = {t: TaskScore.from_json(s) for t, s in (out.tasks or {}).items()}
        return out


@dataclass
class VerifyResult(Record):
    """A built artifact checked against its base right after it was made (``artifacts[name].verify``;
    :mod:`quantkit.verify` makes it)."""

    passed: bool | None = None
    engine: str | None = None
    tokens: int = 0
    kld: float | None = None
    top1: float | None = None
    bits: int | None = None
    bound: float | None = None
    expected: float | None = None  # the healthy ceiling for its bits (verify.KLD_EXPECTED); above it: "high"
    seconds: float = 0.0
    error: str | None = None
    skipped: bool = False
    time: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def status(self) -> str:
        """Short form for summary tables: ``KLD 0.0712 ok``, ``skipped``, ``FAILED``."""
        if self.skipped:
            return "skipped"
        if not self.passed:
            return "FAILED"
        return f"KLD {self.kld:.4f} " + ("high" if self.high else "ok")

    @property
    def high(self) -> bool:
        """Passed (it loads and is far from broken) but above what healthy quantisations of its bits measure."""
        return bool(self.passed and self.expected is not None and self.kld is not None
                    and self.kld > self.expected)

    def high_line(self) -> str | None:
        """The word a passed-but-high check gets in tables, logs and the card (None when not high)."""
        if not self.high:
            return None
        return (f"mean KLD {self.kld:.4g} is above {self.expected:g}, the most a healthy {self.bits}-bit "
                f"quantisation measured on the reference model: it loads and is not broken, but expect a real "
                f"quality loss (measure it with `quantkit eval`)")

    def problem(self) -> str | None:
        """What failed, in words (None when it passed)."""
        if self.passed:
            return None
        if self.skipped:
            return "not verified (built with --no-verify)"
        if self.error:
            return self.error
        return (f"mean KLD {self.kld:.4g} to the base is above {self.bound:g}, the bound for {self.bits}-bit "
                f"({self.tokens} tokens): its outputs are far from the base's")


@dataclass
class PushResult(Record):
    """What the pipeline keeps of a finished push (the run log's ``push:<folder>`` record)."""

    repo: str | None = None
    url: str | None = None
    commit: str | None = None
    revision: str | None = None
    pr_url: str | None = None
    extra: dict = field(default_factory=dict)


# -- one variant of a recipe run ---------------------------------------------------------------------

@dataclass
class VariantResult:
    """One recipe variant through the stages of ``quantkit run``."""

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
    eval: EvalScore | None = None
    bench: BenchScore | None = None
    tasks: TaskScores | None = None  # task accuracy: .tasks[task] -> TaskScore
    gates: dict = field(default_factory=dict)  # gate -> passed?
    pushed: str | None = None

    @property
    def tokens_per_second(self) -> float | None:
        """Generation speed from the benchmark, else the scoring throughput of the evaluation."""
        if self.bench and self.bench.tg_tps is not None:
            return float(self.bench.tg_tps)
        return self.eval.tokens_per_second if self.eval else None

    def to_json(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["eval"] = self.eval.to_json() if self.eval else None
        d["bench"] = self.bench.to_json() if self.bench else None
        d["tasks"] = self.tasks.to_json() if self.tasks else None
        return d


# -- quality gates -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Gate:
    """One quality gate: a limit on one measured value of an :class:`EvalScore`."""

    name: str    # recipe ``eval`` field and evaluate() argument: max_kld
    key: str     # the EvalScore value it limits (and its key in EvalReport.gates/failed): kld_mean
    flag: str    # CLI option: --max-kld
    label: str   # short label in the eval table: KLD
    title: str   # in the report's gate line: "KLD <= 0.05"
    upper: bool  # True: the value must stay <= the limit; False: >= the limit
    percent: bool  # the limit is a fraction shown as a percentage
    shown: Callable[[float], str]  # a measured value as the eval table shows it

    def value(self, score: EvalScore | None) -> float | None:
        return getattr(score, self.key) if score is not None else None

    def passes(self, value: float, limit: float) -> bool:
        return value <= limit if self.upper else value >= limit

    @property
    def op(self) -> str:
        """The comparison a failed value makes with its limit."""
        return ">" if self.upper else "<"

    def show_limit(self, limit: float) -> str:
        return f"{limit * 100:g}%" if self.percent else f"{limit:g}"

    def rule(self, limit: float) -> str:
        return f"{self.title} {'<=' if self.upper else '>='} {self.show_limit(limit)}"


GATES: tuple[Gate, ...] = (
    Gate("max_kld", "kld_mean", "--max-kld", "KLD", "KLD", True, False, lambda v: f"{v:.5f}"),
    Gate("max_ppl_increase", "ppl_increase", "--max-ppl-increase", "dPPL", "PPL increase", True, True,
         lambda v: f"{v * 100:+.2f}%"),
    Gate("min_top1", "top1", "--min-top1", "top-1", "top-1", False, True, lambda v: f"{v * 100:.2f}%"),
)
GATE_BY_KEY = {g.key: g for g in GATES}
