"""``quantkit run RECIPE [RECIPE ...] --ray ADDRESS``: the variants of one or more recipes as Ray tasks.

The driver (this process):

1. loads every recipe and pulls each model once (into the cache the nodes share);
2. sizes each variant with :mod:`quantkit.plan` and turns that into a Ray resource request
   (:func:`variant_resources`); a variant that no alive node can hold stops the run before anything starts;
3. writes a marker file into every output folder and the Hub cache, and a zero-CPU task pinned to each node
   must see them (and each model's ``config.json``), else one line names the path;
4. submits one task per variant: the task runs ``python -m quantkit.cli run RECIPE --only VARIANT --no-push
   --part variants`` in a subprocess on its node -- the same code as a local run, keyed and resumable; Ray
   retries a task whose worker died (``max_retries``) and the retry resumes from the stage keys. Variants that
   share an output folder (the GGUF types of one model share ``quantkit.json`` and the F16 intermediate) run one
   after the other; different folders run at once;
5. prints one line per variant whenever its stage or node changes (read from the run log the workers write);
6. once every variant is over, runs each recipe on the driver with ``part="folders"``: every variant stage is
   restored from the run log (never redone: a variant that did not finish on the cluster is reported failed),
   then report, cards and push run as in a local run, and the same final table comes out.

Ctrl-C cancels the running tasks (``ray.cancel(force=True)``; a task's subprocess dies with its worker).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import sys
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from quantkit.errors import QuantkitError
from quantkit.pipeline import NODE_ENV, RUN_LOG, Pipeline, RunResult
from quantkit.recipe import Recipe, Variant, load_recipe
from quantkit.util import (
    cancel_signals,
    cancel_word,
    exit_code_of,
    handle_cancel_signals,
    interrupt_for,
    raise_cancelled,
)

log = logging.getLogger(__name__)

MARKER = ".quantkit-ray-marker"
RETRIES = 2  # Ray retries of a variant whose worker died (node lost, OOM kill)
GPU_METHODS = ("awq", "gptq")
POLL_S = 0.5


@dataclass
class Job:
    """One variant of one recipe, as a Ray task."""

    recipe: Recipe
    variant: Variant
    resources: dict
    state: str = "waiting"  # waiting | running | done | lost
    status: str | None = None  # the variant's status as its worker's run reported it (done, cached, failed...)
    ref: object = None
    shown: tuple = ()
    error: str | None = None

    @property
    def folder(self) -> Path:
        return (Path(self.recipe.out).expanduser() / self.variant.folder).resolve()

    @property
    def label(self) -> str:
        return f"{Path(self.recipe.path).stem}/{self.variant.name}"


@dataclass
class ClusterRun:
    results: list[RunResult]
    jobs: list[dict] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return max((r.exit_code for r in self.results), default=0)


# -- resources -------------------------------------------------------------------------------------------

def variant_resources(plan, v: Variant, cluster_gpus: float) -> dict:
    """Ray's resource request for variant ``v`` of the model ``plan`` sized: RAM from the plan's quantisation
    needs; for AWQ/GPTQ on a cluster with GPUs, one GPU when the plan's FP16 row fits on one listed NVIDIA
    device, else as many of the largest as its total needs; GGUF and GPU-less clusters use one CPU core."""
    from quantkit.plan import DEVICES

    imatrix = v.method == "gguf" and bool(v.params.get("imatrix"))
    need = plan.needs["gguf+imatrix" if imatrix else v.method]
    res = {"num_cpus": 1, "memory": int(need.ram_bytes)}
    if v.method in GPU_METHODS and cluster_gpus > 0:
        fp16 = plan.row("FP16/BF16")
        biggest = max(d.memory for d in DEVICES if d.kind == "nvidia")
        nvidia = {d.name for d in DEVICES if d.kind == "nvidia"}
        res["num_gpus"] = 1 if nvidia & set(fp16.fits) else math.ceil(fp16.total_bytes / biggest)
    return res


def _fits(res: dict, node: dict) -> bool:
    have = node.get("Resources", {})
    return (have.get("CPU", 0) >= res["num_cpus"] and have.get("GPU", 0) >= res.get("num_gpus", 0)
            and have.get("memory", 0) >= res["memory"])


def check_fit(jobs: list[Job], nodes: list[dict]) -> None:
    """Raise QuantkitError (with the plan's numbers) for the first variant no alive node can hold."""
    from quantkit.plan import _gb

    for j in jobs:
        if any(_fits(j.resources, n) for n in nodes):
            continue
        r = j.resources
        big = max(nodes, key=lambda n: (n["Resources"].get("GPU", 0), n["Resources"].get("memory", 0)))["Resources"]
        raise QuantkitError(
            f"{j.label} ({j.variant.method}) needs {r['num_cpus']} CPU, {r.get('num_gpus', 0)} GPU and "
            f"{_gb(r['memory'])} GB RAM (see `quantkit plan {j.recipe.model}`); no node of the cluster has that "
            f"(largest: {big.get('CPU', 0):g} CPU, {big.get('GPU', 0):g} GPU, {_gb(big.get('memory', 0))} GB)")


# -- storage ---------------------------------------------------------------------------------------------

def _missing(paths: list[str]) -> list[str]:
    return [p for p in paths if not os.path.exists(p)]


def check_storage(ray, must_see: list[str]) -> None:
    """Every alive node must see every path (markers the driver just wrote, the models); else one line."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0, max_retries=0)(_missing)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    refs = {n["NodeManagerAddress"] + " " + n["NodeID"][:8]: probe.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(must_see) for n in nodes}
    for node, ref in refs.items():
        missing = ray.get(ref, timeout=300)
        if missing:
            raise QuantkitError(f"node {node} cannot see {missing[0]}: put the output folders and HF_HOME on "
                                "storage every node mounts (README: Run on a cluster)")


# -- the task --------------------------------------------------------------------------------------------

def _die_with_parent() -> None:
    """In the worker's subprocess: SIGKILL when the Ray worker dies (prctl PR_SET_PDEATHSIG, Linux)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except OSError:
        pass


def run_variant(recipe_path: str, overrides: list[str], variant: str, cwd: str) -> dict:
    """Body of the Ray task: the variant's stages in a subprocess, exactly as a local ``quantkit run --only``
    (in the driver's directory: a recipe's relative paths mean the same)."""
    import subprocess

    import ray

    node = ray.get_runtime_context().get_node_id()[:8]
    ip = ray.util.get_node_ip_address()
    cmd = [sys.executable, "-m", "quantkit.cli", "run", recipe_path, "--only", variant, "--no-push",
           "--part", "variants", "--json"]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, NODE_ENV: f"{ip} {node}", "QUANTKIT_NO_PROGRESS": "1"}
    p = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, preexec_fn=_die_with_parent)
    try:
        status = json.loads(p.stdout)["variants"][0]["status"]
    except (ValueError, KeyError, IndexError):
        status = None
    return {"rc": p.returncode, "node": f"{ip} {node}", "status": status, "stderr": p.stderr[-2000:]}


# -- the driver ------------------------------------------------------------------------------------------

def connect(address: str):
    """``local`` starts a Ray instance here, ``auto`` joins this machine's cluster, ``ray://...`` a remote one;
    an already connected driver (tests) is used as it is. Returns (ray, whether we connected)."""
    try:
        import ray
    except ImportError:
        raise QuantkitError("--ray needs Ray: pip install 'quantkit-llm[ray]'") from None
    if ray.is_initialized():
        return ray, False
    kw = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": False}
    try:
        if address == "local":
            ray.init(**kw)
        else:
            ray.init(address=address, **{k: v for k, v in kw.items() if k != "include_dashboard"})
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise QuantkitError(f"--ray {address}: cannot connect ({str(e).splitlines()[0]})") from None
    handle_cancel_signals(again=True)  # SIGTERM cancels with one line, not Ray's stack dump
    return ray, True


def _stage_of(out: Path, variant: str, cache: dict) -> tuple[str, str] | None:
    """The latest stage a worker started for ``variant`` in the run log of ``out`` and the node it named."""
    if out not in cache:
        try:
            cache[out] = json.loads((out / RUN_LOG).read_text()).get("events", [])
        except (OSError, json.JSONDecodeError):
            cache[out] = []
    for e in reversed(cache[out]):
        if e.get("event") == "started" and e["stage"].endswith(f":{variant}") and e.get("node"):
            return e["stage"].split(":")[0], e["node"]
    return None


def run_on_ray(paths: list[str], address: str, *, overrides=(), only=(), push: bool = True,
               retries: int = RETRIES) -> ClusterRun:
    """Run the recipes at ``paths`` on the Ray cluster at ``address``; see the module docstring."""
    recipes = [load_recipe(p, overrides=overrides) for p in paths]
    pipelines = [Pipeline(r, only=only, push=push) for r in recipes]  # checks --only against each recipe
    ray, connected = connect(address)
    try:
        return _run(ray, recipes, pipelines, list(overrides), only, push, retries)
    finally:
        if connected:
            ray.shutdown()


def _run(ray, recipes, pipelines, overrides, only, push, retries) -> ClusterRun:
    from quantkit.plan import plan

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    gpus = sum(n["Resources"].get("GPU", 0) for n in nodes)
    jobs, must_see, markers = [], [], []
    token = uuid.uuid4().hex
    for r, pl in zip(recipes, pipelines):  # sizes from config + headers: before any download
        p = plan(r.model, revision=r.revision, context=r.eval.ctx)
        jobs += [Job(r, v, variant_resources(p, v, gpus)) for v in pl.variants]
    check_fit(jobs, nodes)
    for pl in pipelines:
        pl.out.mkdir(parents=True, exist_ok=True)
        pl.pull()  # once per model, on the driver, into the shared cache
        markers.append(pl.out / MARKER)
        must_see.append(str(pl.src.path / "config.json"))
    if any(pl.src.id for pl in pipelines):
        from huggingface_hub import constants

        markers.append(Path(constants.HF_HUB_CACHE) / MARKER)
    for m in dict.fromkeys(markers):
        m.parent.mkdir(parents=True, exist_ok=True)
        m.write_text(token)
        must_see.append(str(m))
    try:
        check_storage(ray, list(dict.fromkeys(must_see)))
        _schedule(ray, jobs, overrides, retries)
    finally:
        for m in dict.fromkeys(markers):
            m.unlink(missing_ok=True)
    results = []
    for r in recipes:  # report, cards, push: every variant stage comes from the run log, none is redone
        res = Pipeline(r, only=only, push=push, part="folders").run()
        for v in res.variants:
            j = next(j for j in jobs if j.recipe is r and j.variant.name == v.name)
            if j.error and v.status == "failed":
                v.error = f"{v.error} ({j.error})"
            if v.status == "cached" and j.status == "done":  # restored here, but made on the cluster just now
                v.status = "done"
        results.append(res)
    return ClusterRun(results, [{"variant": j.label, "state": j.state, "resources": j.resources,
                                 "error": j.error} for j in jobs])


@contextlib.contextmanager
def _ctrl_c_flag():
    """While the driver waits on Ray, a cancel (Ctrl-C, SIGTERM, SIGHUP) is remembered in a flag as well as raised
    as usual. Ray's core worker checks for signals inside its blocking calls (``check_signals``) and turns a
    KeyboardInterrupt into a status of its own, so one can be lost on the way back; the scheduling loop reads the
    flag after every call and stops whatever happened to the exception (a driver that went on to report success
    after a Ctrl-C was seen on a busy machine). The handlers are this process's own again for the block: Ray's
    driver installs a SIGTERM handler of its own that prints a C++ stack dump and exits 1. The flag's ``signum``
    says which signal came."""
    flag = threading.Event()
    flag.signum = signal.SIGINT
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    prev = {s: signal.getsignal(s) for s in cancel_signals()}

    def handler(signum, frame):
        flag.signum = signum
        flag.set()
        if prev[signum] in (raise_cancelled, signal.default_int_handler):
            prev[signum](signum, frame)  # the command's own (its watchdog) or Python's default: both raise
        raise interrupt_for(signum)

    for s, h in prev.items():
        if h is not signal.SIG_IGN:
            signal.signal(s, handler)
    try:
        yield flag
    finally:
        for s, h in prev.items():
            if h is not signal.SIG_IGN:
                # a handler set outside Python (None: Ray's) cannot be put back; the command's own is
                signal.signal(s, h if h is not None else raise_cancelled)


def _schedule(ray, jobs: list[Job], overrides: list[str], retries: int) -> None:
    with _ctrl_c_flag() as interrupted:
        _schedule_loop(ray, jobs, overrides, retries, interrupted)


def _schedule_loop(ray, jobs: list[Job], overrides: list[str], retries: int, interrupted: threading.Event) -> None:
    task = ray.remote(max_retries=retries, retry_exceptions=False)(run_variant)
    queues: dict[Path, list[Job]] = {}
    for j in jobs:
        queues.setdefault(j.folder, []).append(j)
    running: dict = {}

    def submit(folder: Path) -> None:
        if queues[folder]:
            j = queues[folder].pop(0)
            j.ref = task.options(**j.resources).remote(str(Path(j.recipe.path).resolve()), overrides, j.variant.name,
                                                      os.getcwd())
            j.state = "running"
            running[j.ref] = j
            log.info("[ray] %s: submitted (%s)", j.label, _fmt(j.resources))

    try:
        for folder in queues:
            submit(folder)
        while running:
            ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_S)
            if interrupted.is_set():
                raise KeyboardInterrupt
            cache: dict = {}
            for j in running.values():
                now = _stage_of(Path(j.recipe.out).expanduser(), j.variant.name, cache)
                if now and now != j.shown:
                    j.shown = now
                    log.info("[ray] %s: %s on node %s", j.label, *now)
            for ref in ready:
                j = running.pop(ref)
                try:
                    out = ray.get(ref)
                    j.state, j.status = "done", out["status"]
                    if out["rc"] not in (0, 1):
                        j.state, j.error = "lost", f"exit {out['rc']} on {out['node']}: {out['stderr'][-300:]}"
                except Exception as e:  # the worker died more often than Ray retries
                    j.state, j.error = "lost", f"{type(e).__name__} after {retries + 1} tries"
                log.info("[ray] %s: %s%s", j.label, j.state, f" ({j.error})" if j.error else "")
                if interrupted.is_set():
                    raise KeyboardInterrupt
                submit(j.folder)
        if interrupted.is_set():  # a Ctrl-C during the last call
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        for ref in running:
            ray.cancel(ref, force=True)
        came = interrupt_for(interrupted.signum)
        err = QuantkitError(f"{cancel_word(came)}: cancelled {len(running)} running variant task(s); run again to "
                            "resume from the stage keys")
        err.exit_code = exit_code_of(came)  # as a Ctrl-C (130) or SIGTERM (143) elsewhere
        raise err from None


def _fmt(res: dict) -> str:
    from quantkit.plan import _gb

    return ", ".join(f"{k.replace('num_', '')} {_gb(v) + ' GB' if k == 'memory' else v}" for k, v in res.items())


def run_recipes(paths: list[str], *, ray: str | None = None, overrides=(), only=(), dry_run: bool = False,
                push: bool = True, progress: bool = False, part: str = "all") -> list[RunResult]:
    """``quantkit run``'s function: the recipes one after the other here, or (``ray`` = an address) on Ray."""
    from quantkit.pipeline import _StderrHandler, run_recipe

    if ray and (dry_run or part != "all"):
        raise QuantkitError("--ray runs whole recipes: drop --dry-run")
    if not ray:
        return [run_recipe(p, overrides=overrides, only=only, dry_run=dry_run, push=push, progress=progress,
                           part=part) for p in paths]
    handler = None
    if progress and not logging.getLogger("quantkit").hasHandlers():
        handler = _StderrHandler()
        for name in ("quantkit.cluster", "quantkit.pipeline"):
            logging.getLogger(name).addHandler(handler)
            logging.getLogger(name).setLevel(logging.INFO)
    try:
        return run_on_ray(list(paths), ray, overrides=overrides, only=only, push=push).results
    finally:
        if handler:
            for name in ("quantkit.cluster", "quantkit.pipeline"):
                logging.getLogger(name).removeHandler(handler)
