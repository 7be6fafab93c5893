"""``quantkit eval --tasks``: task accuracy of each variant and its **recovery** against the base, with
lm-evaluation-harness (``lm_eval``, the optional extra ``quantkit-llm[tasks]``).

How it works
------------
* Tasks are lm-eval's own: a registry name (``arc_easy``, ``hellaswag``...; datasets come from the Hub as
  lm-eval fetches them) or a path to a task YAML in lm-eval's format. A YAML's relative ``data_files`` are
  read relative to the YAML's folder, so a local ``dataset_path: json`` task works offline from anywhere.
* Each model is scored by the engine it will be served with, behind lm-eval's ``LM`` interface: HF formats
  (the base, AWQ, GPTQ, compressed-tensors) through lm-eval's own ``HFLM`` wrapped around
  :func:`quantkit.evaluate.load_hf_model`; a GGUF through :class:`GGUFLM`, which gets log-likelihoods from
  llama.cpp's kernels (:class:`quantkit.evaluate.GGUFScorer`, ``logits_all=True``), never a dequantised copy.
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
* Only log-likelihood tasks (``multiple_choice``, ``loglikelihood``, ``loglikelihood_rolling``) are supported
  by the GGUF adapter for now; ``generate_until`` tasks stop with one line.
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


def _lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.api.model import TemplateLM
    except ImportError:
        raise QuantkitError("lm-evaluation-harness is not installed: pip install 'quantkit-llm[tasks]' "
                            "(or pip install lm_eval)") from None
    return TemplateLM


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


def resolve_tasks(tasks, generation: bool = False) -> TaskSet:
    """Resolve registry names and YAML paths; every task is built once here, so a bad name, YAML or dataset
    stops before any model is loaded, with one line naming it. ``generation``: every model is served by vLLM,
    whose lm-eval model (``local-completions``) generates too, so ``generate_until`` tasks are allowed."""
    _lm_eval()
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
            loaded = manager.load([spec])
        except QuantkitError:
            raise
        except Exception as e:
            raise QuantkitError(f"task {name} could not be loaded: {_first_line(e)}") from None
        for tname, task in loaded["tasks"].items():
            otype = task.get_config("output_type")
            if otype == "generate_until" and not generation:
                raise QuantkitError(f"task {tname} ({name}) generates text (output_type generate_until): only "
                                    "log-likelihood tasks (multiple_choice, loglikelihood, "
                                    "loglikelihood_rolling) are supported for GGUF and transformers; HF-format "
                                    "variants served by vLLM (--engine vllm) run generation tasks too")
    return TaskSet(specs=specs, names=names, manager=manager)


# ------------------------------------------------------------------------------------------ GGUF adapter
def _make_gguf_lm():
    TemplateLM = _lm_eval()

    class GGUFLM(TemplateLM):
        """lm-eval ``LM`` over llama.cpp: log-likelihoods from its kernels (GGUFScorer), tokens from the base's
        HF tokenizer (``tokenizer``) or, without one, from llama.cpp's own tokenizer."""

        backend = "causal"

        def __init__(self, path, tokenizer=None, max_length: int = DEFAULT_MAX_LENGTH, threads: int | None = None):
            from quantkit.evaluate import GGUFScorer

            super().__init__()
            self.path = Path(path)
            self._max_length = int(max_length)
            # lm-eval feeds at most max_length tokens (the last of max_length + 1 is only a target)
            self.scorer = GGUFScorer(self.path, self._max_length, threads)
            self.engine = self.scorer.engine
            self.hf_tokenizer = tokenizer
            self.llm_tokens = None  # the token ids whose logits sit in llama.cpp's buffer (prefix reuse)

        # -- tokens
        @property
        def eot_token_id(self) -> int:
            if self.hf_tokenizer is not None:
                return self.hf_tokenizer.eos_token_id
            return self.scorer.llm.token_eos()

        @property
        def prefix_token_id(self) -> int:
            if self.hf_tokenizer is not None:
                bos = self.hf_tokenizer.bos_token_id
                return bos if bos is not None else self.hf_tokenizer.eos_token_id
            bos = self.scorer.llm.token_bos()
            return bos if bos is not None and bos >= 0 else self.scorer.llm.token_eos()

        @property
        def max_length(self) -> int:
            return self._max_length

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
            if self.hf_tokenizer is not None:
                kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
                return list(self.hf_tokenizer.encode(string, **kw))
            from llama_cpp import llama_vocab_get_add_bos

            add_bos = add_special_tokens
            if add_bos is None:
                add_bos = bool(llama_vocab_get_add_bos(self.scorer.llm._model.vocab))
            return self.scorer.llm.tokenize(string.encode("utf-8"), add_bos=add_bos, special=True)

        def tok_decode(self, tokens, **kwargs) -> str:
            if self.hf_tokenizer is not None:
                return self.hf_tokenizer.decode(tokens)
            return self.scorer.llm.detokenize(tokens).decode("utf-8", errors="replace")

        # -- scoring
        def logits(self, tokens: list[int]):
            """Logits [len(tokens), vocab] for ``tokens``; the KV cache of a shared prefix with the previous call
            is kept (positions before it need no recomputation: a position's logits depend only on the tokens
            up to it)."""
            import numpy as np
            import torch

            llm = self.scorer.llm
            if len(tokens) > llm.n_ctx():
                raise QuantkitError(f"{len(tokens)} tokens exceed the context of {llm.n_ctx()}")
            common = 0
            prev = self.llm_tokens or []
            for a, b in zip(prev, tokens):
                if a != b:
                    break
                common += 1
            common = min(common, len(tokens) - 1)  # evaluate at least one token
            llm.n_tokens = common
            llm.eval(tokens[common:])
            self.llm_tokens = list(tokens)
            return torch.from_numpy(np.array(llm.scores[:len(tokens)], dtype=np.float32))

        def _score(self, context_enc: list[int], continuation_enc: list[int]) -> tuple[float, bool]:
            import torch

            # as lm-eval's HFLM: the last max_length+1 tokens, the final one only as a target
            whole = (context_enc + continuation_enc)[-(self._max_length + 1):]
            inp = whole[:-1]
            n = len(continuation_enc)
            logits = self.logits(inp)[len(inp) - n:].double()
            logp = torch.log_softmax(logits, dim=-1)
            target = torch.tensor(continuation_enc, dtype=torch.long)
            ll = float(logp.gather(1, target[:, None]).sum())
            greedy = bool((logp.argmax(-1) == target).all())
            return ll, greedy

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
            from quantkit.util import progress

            # Sorted by tokens so requests sharing a context are adjacent (KV prefix reuse); answered in order.
            order = sorted(range(len(requests)), key=lambda i: requests[i][1] + requests[i][2])
            out: list[tuple[float, bool] | None] = [None] * len(requests)
            for i in progress(order, desc=f"{self.path.name} (llama.cpp)", unit="req", disable=disable_tqdm):
                _, ctx_enc, cont_enc = requests[i]
                out[i] = self._score(list(ctx_enc), list(cont_enc))
            return out  # type: ignore[return-value]

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            from lm_eval import utils

            out = []
            for (string,) in [r.args for r in requests]:
                windows = map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self._max_length, context_len=1))
                out.append(sum(self._score(list(c), list(t))[0] for c, t in windows))
            return out

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            raise QuantkitError("generate_until tasks are not supported by quantkit's llama.cpp adapter yet")

        def close(self):
            self.scorer.close()

    return GGUFLM


def gguf_lm(path, tokenizer=None, max_length: int = DEFAULT_MAX_LENGTH, threads: int | None = None):
    """An lm-eval ``LM`` scoring the GGUF at ``path`` with llama.cpp (see :class:`GGUFLM` in the docstring)."""
    return _make_gguf_lm()(path, tokenizer=tokenizer, max_length=max_length, threads=threads)


def hf_lm(path, tokenizer, max_length: int = DEFAULT_MAX_LENGTH, batch_size: int = 1, threads: int | None = None):
    """lm-eval's own ``HFLM`` around the model quantkit loads for scoring (fp32 on CPU)."""
    _lm_eval()
    import torch
    from lm_eval.models.huggingface import HFLM

    from quantkit.evaluate import _hf_device, load_hf_model
    from quantkit.util import dist_version

    if threads:
        torch.set_num_threads(threads)
    device = _hf_device()
    model = load_hf_model(Path(path), device)
    # HFLM warns that a model object (not a name) was passed: that is deliberate here
    logging.getLogger("lm_eval.models.huggingface").setLevel(logging.ERROR)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, max_length=max_length, batch_size=batch_size, device=device)
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    lm.engine = f"transformers {dist_version('transformers')} ({device}, {dtype})"
    return lm


def vllm_lm(path, tokenizer_path, max_length: int = DEFAULT_MAX_LENGTH, threads: int | None = None):
    """lm-eval's own OpenAI-compatible completions model (``local-completions``) against the vLLM server of
    ``path`` (shared with verify/eval/bench in this process): requests go as token ids of the base tokenizer;
    log-likelihoods come from the prompt's log-probabilities (``echo``), generation from the server."""
    _lm_eval()
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from quantkit import vllm

    srv = vllm.server(path, threads=threads)
    logging.getLogger("lm_eval.models.api_models").setLevel(logging.ERROR)
    lm = LocalCompletionsAPI(base_url=f"{srv.url}/v1/completions", model=vllm.SERVED_NAME,
                             tokenizer=str(tokenizer_path), tokenizer_backend="huggingface", tokenized_requests=True,
                             max_length=max_length, num_concurrent=1, max_retries=1, timeout=int(vllm.REQUEST_TIMEOUT))
    lm.engine = f"{srv.install.label} (served; lm-eval local-completions)"
    return lm


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
        key = next(k for k in res if k.split(",")[0] == metric and "_stderr" not in k)
        flt = key.split(",", 1)[1]
        samples = [s for s in results["samples"][task] if s.get("filter", flt) == flt]
        per_doc = {s["doc_id"]: _num(s.get(metric)) for s in samples}
        score = _num(res[key])
        if None in per_doc.values() or not per_doc or score is None or \
                not math.isclose(sum(per_doc.values()) / len(per_doc), score, rel_tol=1e-9, abs_tol=1e-12):
            per_doc = None
        hib = (results.get("higher_is_better", {}).get(task) or {}).get(metric)
        out[task] = {"metric": metric, "filter": flt, "score": score,
                     "stderr": _num(res.get(f"{metric}_stderr,{flt}")),
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


def _run_tasks(lm, taskset: TaskSet, limit, num_fewshot) -> tuple[dict, float]:
    import lm_eval

    t0 = time.perf_counter()
    try:
        res = lm_eval.simple_evaluate(model=lm, tasks=list(taskset.specs), task_manager=taskset.manager,
                                      num_fewshot=num_fewshot, limit=limit, log_samples=True,
                                      bootstrap_iters=BOOTSTRAP_ITERS)
    except QuantkitError:
        raise
    except Exception as e:
        raise QuantkitError(f"lm-eval failed on {lm.engine.split(' (')[0]}: {_first_line(e)}") from None
    return task_scores(res), time.perf_counter() - t0


def _base_cache_file(base_sha: str, tasks, limit, num_fewshot, max_length: int, batch_size: int,
                     engine: str = "transformers") -> Path:
    """Where the base's scores for these settings are kept: keyed by the base's SHA, the tasks (YAML and data
    sha256), limit, shots, max_length, batch size and the engine versions."""
    from quantkit.util import cache_home, dist_version
    from quantkit.vllm import installed_label

    key = hashlib.sha256(json.dumps({
        "base": base_sha, "tasks": task_identity(tasks), "limit": limit, "num_fewshot": num_fewshot,
        "max_length": max_length, "batch_size": batch_size,
        "engines": {d: dist_version(d) for d in ("lm_eval", "transformers", "torch")},
        **({"engine": installed_label()} if engine == "vllm" else {})},
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
               cache_base: bool = False, engine: str = "auto") -> TaskReport:
    """Score ``base`` and every variant on ``tasks`` with lm-eval; see the module docstring. ``cache_base``: keep
    the base's scores under quantkit's cache (:func:`_base_cache_file`), so scoring N variants one at a time
    scores the base once. ``engine``: how HF-format variants run (:func:`quantkit.evaluate.hf_engine`); when
    every variant is served by vLLM, the base is served by the same vLLM and generation tasks are allowed."""
    from transformers import AutoTokenizer

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
    taskset = resolve_tasks(tasks, generation=ref == "vllm")
    src = resolve_model(base)
    tok = base_tokenizer(src.path)

    cache = (_base_cache_file(src.sha, tasks, limit, num_fewshot, max_length, batch_size, ref)
             if cache_base else None)
    hit = _read_base_cache(cache)
    if hit:
        base_scores, base_s, base_engine, max_length = hit
        log.info("[tasks] base scores of %s from the cache (%s)", src.name, cache)
    else:
        from quantkit.vllm import model_max_len

        # never beyond the base's trained context, and the same for every engine
        max_length = min(max_length, model_max_len(src.path) or max_length)
        base_lm = vllm_lm(src.path, src.path, max_length, threads) if ref == "vllm" else \
            hf_lm(src.path, tok, max_length, batch_size, threads)
        base_lm._max_length = max_length
        base_scores, base_s = _run_tasks(base_lm, taskset, limit, num_fewshot)
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
        if v.kind == "gguf":
            lm = gguf_lm(v.path, tok, max_length, threads)
        elif v.engine == "vllm":
            lm = vllm_lm(v.path, src.path, max_length, threads)
        else:
            own = tok
            if any((v.path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
                own = AutoTokenizer.from_pretrained(v.path)
            lm = hf_lm(v.path, own, max_length, batch_size, threads)
        scores, secs = _run_tasks(lm, taskset, limit, num_fewshot)
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
                   "engine_short": "llama.cpp" if v.kind == "gguf" else
                   ("vLLM" if v.engine == "vllm" else "transformers"),
                   "seconds": round(secs, 2), "gates": {}}
            if g.key in gates:
                floor = gates[g.key]["limit"]
                row["gates"][g.key] = ok = rec is not None and g.passes(rec, floor)
                if not ok:
                    failed.append({"variant": v.name, "task": task, "gate": g.key, "value": rec, "limit": floor,
                                   "shown": f"{g.shown(rec)} ({task})", "limit_shown": gates[g.key]["shown"]})
            rows.append(row)
    context = {"tasks": taskset.names, "task_names": list(base_scores), "limit": limit, "num_fewshot": num_fewshot,
               "max_length": max_length, "lm_eval": dist_version("lm_eval"), "time": now_iso()}
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
