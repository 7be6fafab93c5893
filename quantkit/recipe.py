"""Recipe files: one YAML file says which model, which variants, how to calibrate, evaluate, gate and publish.

Format (``quantkit: 1``)::

    quantkit: 1
    model: Qwen/Qwen2.5-7B-Instruct        # Hub id, local folder, or builtin:smollm2-135m
    revision: main                         # optional; resolved to a commit SHA
    out: out/qwen2.5-7b                    # optional; default quantkit-out/{model_name}
    variants:
      - method: gguf
        types: [Q4_K_M, Q5_K_M, Q8_0]
        imatrix: true                      # importance matrix from `calibration`
      - method: awq
        bits: 4
        group_size: 128
      - method: gptq
        bits: 8
        group_size: 128
        act_order: true
    calibration: {spec: builtin, samples: 128, seq_len: 512}
    eval:
      text: builtin
      ctx: 512
      max_tokens: 4096
      max_kld: 0.05                        # gates (null = no gate)
      max_ppl_increase: 5%                 # or a fraction: 0.05
      min_top1: null
      tasks: [arc_easy, my_task.yaml]      # optional: lm-eval task accuracy and recovery (the tasks stage);
                                           # generation tasks too (examples/own-gsm/own_gsm.yaml)
      limit: 200                           # documents per task; num_fewshot: null (each task's default)
      min_recovery: 97%                    # task gate: variant score / base score
      bench: {enabled: true}
    publish:
      repo: ${HF_ORG}/{model_name}-{method}
      private: true
      per: method                          # method: one repo per method (all GGUF types together); variant
      only_passing: true
      enabled: true

``${VAR}`` in any string is replaced by the environment variable (an unset one is an error). ``{model_name}``,
``{method}`` (GGUF/AWQ/GPTQ), ``{variant}`` and ``{bits}`` are filled in ``publish.repo`` per output folder.
Unknown keys are errors; every error names the file, the line, the field and what is allowed.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from quantkit.errors import QuantkitError
from quantkit.formats import DEFAULT_GROUP_SIZE, HF_ENGINES, HF_METHODS, gguf_spec, hf_param_problems

VERSION = 1
METHODS = ("gguf", *HF_METHODS)
ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
REPO_FIELDS = ("model_name", "method", "variant", "bits")


class RecipeError(QuantkitError):
    """A recipe mistake: ``file:line: field: what is wrong (allowed: ...)``."""


# -- YAML with line numbers ---------------------------------------------------------------------------

class _Doc:
    """Plain Python values + the 1-based line of every path (tuple of keys / indices)."""

    def __init__(self, value: Any, lines: dict[tuple, int]):
        self.value = value
        self.lines = lines
        self.overrides: dict[tuple, str] = {}  # path -> the --set item that set it


def _load_yaml(text: str, where: str) -> _Doc:
    import yaml

    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"{where}{line}: not valid YAML ({problem})") from None
    lines: dict[tuple, int] = {}
    constructor = yaml.SafeLoader("")

    def walk(n, path):
        lines[path] = n.start_mark.line + 1
        if isinstance(n, yaml.MappingNode):
            out = {}
            for k, v in n.value:
                key = constructor.construct_object(k, deep=True)
                if not isinstance(key, str):
                    raise RecipeError(f"{where}:{k.start_mark.line + 1}: key {key!r} must be a string")
                if key in out:
                    raise RecipeError(f"{where}:{k.start_mark.line + 1}: {_dotted(path + (key,))}: given twice")
                lines[path + (key,)] = k.start_mark.line + 1
                out[key] = walk(v, path + (key,))
                lines[path + (key,)] = k.start_mark.line + 1
            return out
        if isinstance(n, yaml.SequenceNode):
            return [walk(v, path + (i,)) for i, v in enumerate(n.value)]
        return constructor.construct_object(n, deep=True)

    if node is None:
        raise RecipeError(f"{where}:1: the recipe is empty (start with `quantkit: 1`; "
                          "`quantkit recipe init MODEL` writes a starter)")
    return _Doc(walk(node, ()), lines)


def _dotted(path: tuple) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


# -- typed recipe ---------------------------------------------------------------------------------------

@dataclass
class Calibration:
    spec: str = "builtin"
    samples: int = 128
    seq_len: int = 512


@dataclass
class Bench:
    enabled: bool = True
    prompt_tokens: int = 128
    gen_tokens: int = 32
    repeats: int = 1
    threads: int | None = None  # None: the bench default (all cores)


@dataclass
class Eval:
    enabled: bool = True
    text: str = "builtin"
    ctx: int = 512
    max_tokens: int = 4096
    max_kld: float | None = None
    max_ppl_increase: float | None = None
    min_top1: float | None = None
    tasks: list[str] = field(default_factory=list)  # lm-eval task names / task YAML paths (the tasks stage)
    limit: float | None = None  # documents per task (a fraction: of each task)
    num_fewshot: int | None = None
    chat_template: bool = False  # tasks: prompts through the base tokenizer's chat template
    min_recovery: float | None = None  # task gate: variant score / base score
    bench: Bench = field(default_factory=Bench)

    def gates(self) -> dict:
        return {"max_kld": self.max_kld, "max_ppl_increase": self.max_ppl_increase, "min_top1": self.min_top1}


@dataclass
class Publish:
    enabled: bool = True
    repo: str = "{model_name}-{method}"
    private: bool = True
    per: str = "method"
    only_passing: bool = True
    license: str | None = None  # SPDX id when the base's card has none
    accept_license_terms: bool = False  # confirm a public push of a base whose licence carries terms


@dataclass
class Variant:
    """One artifact the recipe makes (one GGUF type, or one AWQ/GPTQ configuration)."""

    name: str  # "Q4_K_M", "AWQ-INT4-g128", ...
    method: str  # gguf | awq | gptq
    params: dict  # the quantiser's parameters
    entry: int  # index in `variants:`
    line: int
    folder: str = ""  # output folder (relative to out)
    repo: str | None = None  # rendered publish repo


@dataclass
class Recipe:
    path: str
    model: str
    revision: str | None
    out: str
    variants: list[Variant]
    calibration: Calibration
    eval: Eval
    publish: Publish
    raw: dict = field(default_factory=dict)
    adapter: str | None = None  # a PEFT LoRA merged into the model before quantising (quantkit.lora)
    adapter_revision: str | None = None
    trust_remote_code: bool = False  # the model's own Python may run (quantkit.trust); recorded in quantkit.json

    @property
    def model_name(self) -> str:
        if self.adapter:  # the fine-tune is what is published
            return self.adapter.rstrip("/").split("/")[-1]
        if self.model.startswith("builtin:"):
            return {"builtin:smollm2-135m": "SmolLM2-135M-Instruct"}.get(self.model, self.model.split(":", 1)[1])
        return self.model.rstrip("/").split("/")[-1]

    def variant_names(self) -> list[str]:
        return [v.name for v in self.variants]

    def folders(self) -> dict[str, list[Variant]]:
        out: dict[str, list[Variant]] = {}
        for v in self.variants:
            out.setdefault(v.folder, []).append(v)
        return out

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("raw", None)
        return d


# -- schema -------------------------------------------------------------------------------------------------

# field -> (python types, description of what is allowed)
_INT = ((int,), "an integer")
_POS = ((int,), "a positive integer")
_NUM = ((int, float), "a number")
_BOOL = ((bool,), "true or false")
_STR = ((str,), "a string")
_OPT_NUM = ((int, float, type(None)), "a number or null")
_OPT_STR = ((str, type(None)), "a string or null")

TOP = {"quantkit": _INT, "model": _STR, "revision": _OPT_STR, "adapter": _OPT_STR, "adapter_revision": _OPT_STR,
       "trust_remote_code": _BOOL, "out": _STR, "variants": ((list,), "a list"),
       "calibration": ((dict,), "a mapping"), "eval": ((dict,), "a mapping"), "publish": ((dict,), "a mapping")}
CALIBRATION = {"spec": _STR, "samples": _POS, "seq_len": _POS}
_FRAC = ((int, float, str, type(None)), "a fraction like 0.05, a percentage like '5%', or null")
EVAL = {"enabled": _BOOL, "text": _STR, "ctx": _POS, "max_tokens": _POS, "max_kld": _OPT_NUM,
        "max_ppl_increase": _FRAC, "min_top1": _FRAC, "bench": ((dict, bool), "a mapping or true/false"),
        "tasks": ((list, str), "a list of lm-eval task names or task YAML paths"),
        "limit": ((int, float, type(None)), "a positive number of documents per task (or a fraction), or null"),
        "num_fewshot": ((int, type(None)), "an integer >= 0 or null"), "chat_template": _BOOL,
        "min_recovery": _FRAC}
BENCH = {"enabled": _BOOL, "prompt_tokens": _POS, "gen_tokens": _POS, "repeats": _POS,
         "threads": ((int, type(None)), "a positive integer or null")}
PUBLISH = {"enabled": _BOOL, "repo": _STR, "private": _BOOL, "per": _STR, "only_passing": _BOOL,
           "license": _OPT_STR, "accept_license_terms": _BOOL}
_HF_VARIANT = {"method": _STR, "name": _STR, "bits": _POS, "group_size": _INT, "format": _STR, "engine": _STR}
_HF_OPTIONS = {"sym": _BOOL, "act_order": _BOOL, "damp": _NUM}  # what a method's `options` may list
VARIANT = {
    "gguf": {"method": _STR, "types": ((list, str), "a list of GGUF types"), "imatrix": _BOOL,
             "outtype": _STR, "split_max_size": _STR},
    **{name: {**_HF_VARIANT, **{o: _HF_OPTIONS[o] for o in m.options}} for name, m in HF_METHODS.items()},
}


class _Checker:
    def __init__(self, where: str, doc: _Doc):
        self.where = where
        self.doc = doc

    def line(self, path: tuple) -> int:
        while path and path not in self.doc.lines:
            path = path[:-1]
        return self.doc.lines.get(path, 1)

    def fail(self, path: tuple, msg: str):
        for i in range(len(path), 0, -1):
            if path[:i] in self.doc.overrides:
                raise RecipeError(f"{self.where}: --set {self.doc.overrides[path[:i]]}: {_dotted(path)}: {msg}")
        raise RecipeError(f"{self.where}:{self.line(path)}: {_dotted(path)}: {msg}")

    def mapping(self, value: Any, path: tuple, schema: dict, required=()) -> dict:
        if not isinstance(value, dict):
            self.fail(path, f"must be a mapping of {', '.join(schema)} (got {type(value).__name__})")
        for k in value:
            if k not in schema:
                close = _close(k, schema)
                hint = f" (did you mean {close!r}?)" if close else ""
                self.fail(path + (k,), f"unknown key{hint}; allowed: {', '.join(schema)}")
        for k in required:
            if k not in value:
                self.fail(path, f"missing `{k}` (required)")
        for k, v in value.items():
            types, what = schema[k]
            ok = isinstance(v, types) and not (isinstance(v, bool) and bool not in types)
            if ok and what == "a positive integer" and v < 1:
                ok = False
            if not ok:
                self.fail(path + (k,), f"must be {what}, got {v!r}")
        return value


def _close(word: str, allowed) -> str | None:
    import difflib

    m = difflib.get_close_matches(word, list(allowed), n=1, cutoff=0.6)
    return m[0] if m else None


def _expand_env(value: Any, path: tuple, chk: _Checker) -> Any:
    if isinstance(value, str):
        def sub(m):
            v = os.environ.get(m.group(1))
            if v is None:
                chk.fail(path, f"environment variable ${{{m.group(1)}}} is not set (export it, or write the value)")
            return v
        return ENV_RE.sub(sub, value)
    if isinstance(value, dict):
        return {k: _expand_env(v, path + (k,), chk) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, path + (i,), chk) for i, v in enumerate(value)]
    return value


def _apply_overrides(doc: _Doc, overrides, where: str) -> None:
    import yaml

    for item in overrides or ():
        if "=" not in item:
            raise RecipeError(f"--set {item}: expected FIELD=VALUE, e.g. --set eval.max_kld=0.03")
        key, raw = item.split("=", 1)
        parts: list = [int(p) if p.isdigit() else p for p in key.strip().split(".") if p != ""]
        if not parts:
            raise RecipeError(f"--set {item}: empty field name")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        cur = doc.value
        for i, p in enumerate(parts[:-1]):
            nxt = parts[i + 1]
            if isinstance(cur, list):
                if not isinstance(p, int) or p >= len(cur):
                    raise RecipeError(f"--set {item}: {_dotted(tuple(parts[:i + 1]))} is not an entry of the list")
                cur = cur[p]
            elif isinstance(cur, dict):
                if p not in cur or cur[p] is None:
                    cur[p] = [] if isinstance(nxt, int) else {}
                cur = cur[p]
            else:
                raise RecipeError(f"--set {item}: {_dotted(tuple(parts[:i]))} is not a mapping")
        last = parts[-1]
        if isinstance(cur, list):
            if not isinstance(last, int) or last >= len(cur):
                raise RecipeError(f"--set {item}: no list entry {last}")
            cur[last] = value
        elif isinstance(cur, dict):
            cur[last] = value
        else:
            raise RecipeError(f"--set {item}: cannot set a field inside a {type(cur).__name__}")
        doc.overrides[tuple(parts)] = item


def parse_recipe(text: str, *, where: str = "<recipe>", overrides=()) -> Recipe:
    """Validate recipe ``text`` into a :class:`Recipe`; raises :class:`RecipeError` (one line) on a mistake."""
    doc = _load_yaml(text, where)
    _apply_overrides(doc, overrides, where)
    chk = _Checker(where, doc)
    top = chk.mapping(doc.value, (), TOP, required=("quantkit", "model", "variants"))
    top = _expand_env(top, (), chk)
    if top["quantkit"] != VERSION:
        chk.fail(("quantkit",), f"recipe format {top['quantkit']} is not supported; allowed: {VERSION}")
    model = top["model"].strip()
    if not model:
        chk.fail(("model",), "must name a model: a Hub id (org/name), a local folder or builtin:smollm2-135m")
    if model.startswith("builtin:"):
        from quantkit.demo import BUILTINS

        if model.split(":", 1)[1] not in BUILTINS:
            chk.fail(("model",), f"unknown built-in model; allowed: {', '.join('builtin:' + b for b in BUILTINS)}")

    cal_raw = chk.mapping(top.get("calibration") or {}, ("calibration",), CALIBRATION)
    calibration = Calibration(**cal_raw)
    if "spec" in cal_raw:
        from quantkit.calibration import parse_spec

        try:
            parse_spec(calibration.spec)
        except QuantkitError as e:
            chk.fail(("calibration", "spec"), str(e))

    ev_raw = dict(chk.mapping(top.get("eval") or {}, ("eval",), EVAL))
    bench_raw = ev_raw.pop("bench", {})
    if isinstance(bench_raw, bool):
        bench_raw = {"enabled": bench_raw}
    bench = Bench(**chk.mapping(bench_raw or {}, ("eval", "bench"), BENCH))
    from quantkit.evaluate import parse_fraction

    for g, maximum in (("max_ppl_increase", None), ("min_top1", 1), ("min_recovery", None)):
        try:
            ev_raw[g] = parse_fraction(ev_raw.get(g), g, maximum=maximum)
        except QuantkitError as e:
            chk.fail(("eval", g), str(e).replace(f"{g} ", "", 1))
    ev_raw["tasks"] = _tasks(ev_raw.get("tasks"), chk)
    if ev_raw.get("limit") is not None and ev_raw["limit"] <= 0:
        chk.fail(("eval", "limit"), f"must be positive (or null for every document), got {ev_raw['limit']}")
    if ev_raw.get("num_fewshot") is not None and ev_raw["num_fewshot"] < 0:
        chk.fail(("eval", "num_fewshot"), f"must be >= 0 (or null: each task's default), got {ev_raw['num_fewshot']}")
    if ev_raw.get("min_recovery") is not None and not ev_raw["tasks"]:
        chk.fail(("eval", "min_recovery"), "is a gate on task scores: list `tasks` too")
    ev = Eval(**ev_raw, bench=bench)
    if ev.max_kld is not None and ev.max_kld < 0:
        chk.fail(("eval", "max_kld"), f"must be >= 0 (or null for no gate), got {ev.max_kld}")
    if ev.text != "builtin":
        from pathlib import Path as _P

        if not _P(os.path.expanduser(ev.text)).is_file():
            chk.fail(("eval", "text"), f"no such file {ev.text!r} (give a UTF-8 text file, or builtin)")

    pub_raw = dict(chk.mapping(top.get("publish") or {}, ("publish",), PUBLISH))
    if "repo" not in pub_raw:  # nothing to publish to: publishing is off unless asked for
        if pub_raw.get("enabled"):
            chk.fail(("publish",), "enabled is true but no `repo` is given (e.g. repo: my-org/{model_name}-{method})")
        pub_raw["enabled"] = False
    pub = Publish(**pub_raw)
    if pub.per not in ("method", "variant"):
        chk.fail(("publish", "per"), f"must be one of method, variant (got {pub.per!r})")
    for name in re.findall(r"\{([^{}]*)\}", pub.repo):
        if name not in REPO_FIELDS:
            chk.fail(("publish", "repo"), f"unknown placeholder {{{name}}}; allowed: "
                                           + ", ".join("{" + f + "}" for f in REPO_FIELDS))

    if pub.enabled and "/" not in pub.repo.split("{")[0] and not re.match(r"^[^/{}]*\{[^}]*\}/", pub.repo):
        chk.fail(("publish", "repo"), f"{pub.repo!r} names no namespace: write it as my-org/{{model_name}}-{{method}} "
                                      "(or set publish.enabled: false)")
    recipe = Recipe(path=where, model=model, revision=top.get("revision"),
                    out=top.get("out") or "", variants=[], calibration=calibration, eval=ev, publish=pub,
                    raw=top, adapter=top.get("adapter"), adapter_revision=top.get("adapter_revision"),
                    trust_remote_code=bool(top.get("trust_remote_code", False)))
    if not recipe.out:
        recipe.out = f"quantkit-out/{_safe(recipe.model_name)}"
    recipe.variants = _variants(top["variants"], chk, recipe)
    return recipe


def _tasks(raw, chk: _Checker) -> list[str]:
    """``eval.tasks``: lm-eval names or task YAML paths (relative paths as given, like ``eval.text``); a YAML
    that is missing or names missing data files is an error here, before any model is loaded."""
    if raw is None:
        return []
    items = raw.split(",") if isinstance(raw, str) else raw
    out = []
    for i, t in enumerate(items):
        path = ("eval", "tasks") if isinstance(raw, str) else ("eval", "tasks", i)
        if not isinstance(t, str) or not t.strip():
            chk.fail(path, f"must be an lm-eval task name or a task YAML path, got {t!r}")
        t = t.strip()
        p = Path(os.path.expanduser(t))
        if t.endswith((".yaml", ".yml")) or p.is_file():
            if not p.is_file():
                chk.fail(path, f"no such task YAML {t!r} (give an lm-eval task name or a task YAML file)")
            from quantkit.tasks import load_task_yaml

            try:
                load_task_yaml(p.resolve())
            except ImportError:  # lm-eval is optional: the run says how to install it
                pass
            except QuantkitError as e:
                chk.fail(path, str(e))
        if t not in out:
            out.append(t)
    return out


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-") or "model"


def _variants(entries: list, chk: _Checker, recipe: Recipe) -> list[Variant]:
    if not entries:
        chk.fail(("variants",), "is empty: list at least one {method: gguf|awq|gptq, ...}")
    out: list[Variant] = []
    seen: dict[str, tuple] = {}
    for i, e in enumerate(entries):
        path = ("variants", i)
        if not isinstance(e, dict):
            chk.fail(path, f"must be a mapping like {{method: gguf, types: [Q4_K_M]}}, got {e!r}")
        method = e.get("method")
        if method is None:
            chk.fail(path, f"missing `method` (required); allowed: {', '.join(METHODS)}")
        if method not in METHODS:
            chk.fail(path + ("method",), f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
        chk.mapping(e, path, VARIANT[method], required=("types",) if method == "gguf" else ())
        line = chk.line(path)
        if method == "gguf":
            types = e["types"]
            types = [t for t in types.split(",")] if isinstance(types, str) else types
            if not types:
                chk.fail(path + ("types",), "is empty; list GGUF types such as Q4_K_M, Q8_0")
            outtype = e.get("outtype", "auto")
            if outtype not in ("auto", "f16", "bf16", "f32"):
                chk.fail(path + ("outtype",), f"must be one of auto, f16, bf16, f32 (got {outtype!r})")
            imatrix = bool(e.get("imatrix", False))
            split = {}
            if e.get("split_max_size") is not None:
                from quantkit.ggufio import split_size_bytes

                try:
                    split_size_bytes(e["split_max_size"])
                    split = {"split_max_size": str(e["split_max_size"]).strip().upper()}
                except QuantkitError as err:
                    chk.fail(path + ("split_max_size",), str(err))
            for j, t in enumerate(types):
                try:
                    norm, needs = gguf_spec(t)
                except QuantkitError as err:
                    chk.fail(path + ("types", j), str(err))
                if needs and not imatrix:
                    chk.fail(path + ("types", j), f"{norm} needs an importance matrix: add `imatrix: true`")
                v = Variant(name=norm, method="gguf", entry=i, line=line,
                            params={"type": norm, "imatrix": imatrix, "outtype": outtype, **split})
                out.append(v)
        else:
            bits = e.get("bits", HF_METHODS[method].default_bits)
            gs = e.get("group_size", DEFAULT_GROUP_SIZE)
            # the same rules `quantkit awq|gptq` apply before any download
            for param, problem in hf_param_problems(method, bits=bits, group_size=gs, fmt=e.get("format")).items():
                chk.fail(path + (param,), problem)
            if e.get("engine", "auto") not in HF_ENGINES:
                chk.fail(path + ("engine",), f"must be one of {', '.join(HF_ENGINES)} (got {e['engine']!r}): the "
                                             "engine that checks, scores and benchmarks it")
            params = {"bits": bits, "group_size": gs}
            for k in ("format", "engine", *HF_METHODS[method].options):
                if k in e:
                    params[k] = e[k]
            name = e.get("name") or f"{method.upper()}-INT{bits}-g{gs if gs != -1 else 'channel'}"
            out.append(Variant(name=name, method=method, entry=i, line=line, params=params))
    for v in out:
        if v.name in seen:
            chk.fail(("variants", v.entry), f"variant {v.name} is also made by variants[{seen[v.name][0]}]: "
                                            "give each one a distinct `name`")
        seen[v.name] = (v.entry,)

    # folders and repos
    repos: dict[str, str] = {}
    for v in out:
        if v.method == "gguf":
            v.folder = (f"{_safe(recipe.model_name)}-GGUF" if recipe.publish.per == "method"
                        else f"{_safe(recipe.model_name)}-{v.name}-GGUF")
        else:
            v.folder = f"{_safe(recipe.model_name)}-{v.name}"
        fields = {"model_name": recipe.model_name, "method": v.method.upper(),
                  "variant": v.name if (recipe.publish.per == "variant" or v.method != "gguf") else "GGUF",
                  "bits": v.params.get("bits", "")}
        v.repo = recipe.publish.repo.format(**fields)
        if repos.get(v.repo, v.folder) != v.folder:
            chk.fail(("publish", "repo"), f"renders to {v.repo} for two output folders ({repos[v.repo]} and "
                                          f"{v.folder}); put {{variant}} in it or set per: variant")
        repos[v.repo] = v.folder
    return out


def load_recipe(path: str | os.PathLike, *, overrides=()) -> Recipe:
    """Read and validate the recipe at ``path`` (``overrides``: ``["eval.max_kld=0.03", ...]``)."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"{p}: no such recipe file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"{p}: not a UTF-8 text file") from None
    return parse_recipe(text, where=str(p), overrides=overrides)


def init_recipe(model: str) -> str:
    """A commented starter recipe for MODEL."""
    name = model.rstrip("/").split("/")[-1] if not model.startswith("builtin:") else "SmolLM2-135M-Instruct"
    return f"""\
# quantkit recipe -- check with `quantkit recipe check FILE`, run with `quantkit run FILE`.
# Size it first: `quantkit plan {model}`.
quantkit: 1
model: {model}
# revision: main                  # branch, tag or commit SHA; resolved and recorded
# trust_remote_code: false        # true lets the model's own Python files run (only for code you trust)
out: quantkit-out/{_safe(name)}         # artifacts, cards, report and the run log go here

variants:
  - method: gguf                  # llama.cpp / Ollama
    types: [Q4_K_M, Q5_K_M, Q8_0]
    imatrix: true                 # importance matrix from `calibration` (needed for IQ* types)
  # - method: awq                 # vLLM / TGI / transformers
  #   bits: 4
  #   group_size: 128
  # - method: gptq
  #   bits: 8
  #   group_size: 128
  #   act_order: true

calibration:
  spec: builtin                   # builtin | file.txt | file.jsonl | hub:org/name:split:column
  samples: 128
  seq_len: 512

eval:
  text: builtin                   # text all variants are scored on (never the calibration text)
  ctx: 512
  max_tokens: 4096
  max_kld: 0.05                   # gates: a variant above/below fails the run (null = no gate)
  max_ppl_increase: 5%            # perplexity increase over the base model (or a fraction: 0.05)
  min_top1: null
  # tasks: [arc_easy]             # lm-eval task names or task YAML paths: accuracy and recovery vs the base
  # limit: 200                    # documents per task
  # chat_template: false          # tasks: prompts through the base tokenizer's chat template
  # min_recovery: 97%             # gate: variant score / base score
  bench:
    enabled: true

publish:
  enabled: true
  repo: ${{HF_ORG}}/{{model_name}}-{{method}}   # {{model_name}} {{method}} {{variant}} {{bits}}; ${{ENV}} expanded
  private: true
  per: method                     # method: one repo per method; variant: one repo per variant
  only_passing: true              # never push a variant that failed its gate
"""
