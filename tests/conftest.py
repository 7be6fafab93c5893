import os
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# A suite started as a background job (`nohup bash scripts/test.sh &`, `cmd &` in a script, some CI wrappers and job
# schedulers) runs with SIGINT ignored, and every child it starts inherits that through exec: a Ctrl-C drill's
# signal would never arrive. A handled signal is reset to its default at exec, so handling it here gives every
# child this suite starts (xdist workers, quantkit commands under drill) a deliverable SIGINT.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
os.environ.setdefault("QUANTKIT_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# vLLM takes ~30 s to serve a model on 2 cores: tests/test_vllm.py serves what it checks (the `vllm_on` fixture);
# everywhere else HF formats are checked in transformers, and their records say "not checked in vLLM here".
VLLM_SETTING = os.environ.get("QUANTKIT_VLLM")
os.environ["QUANTKIT_VLLM"] = "off"

import fixtures_models as fm  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_hf() -> Path:
    """SmolLM2-135M-Instruct as an HF folder (fp32 safetensors + tokenizer + licence card), cached."""
    return fm.build_smollm2_hf()


@pytest.fixture(scope="session")
def smollm2_continuous() -> Path:
    """The continuous SmolLM2 (weights redrawn from their Q4_1/Q8_0 cells, healed): quality tests' model."""
    return fm.build_smollm2_continuous()


@pytest.fixture(scope="session")
def smollm2_gguf_q41() -> Path:
    return fm.smollm2_gguf()


@pytest.fixture(scope="session")
def tiny_llama() -> Path:
    return fm.build_tiny("llama")


@pytest.fixture(scope="session")
def tiny_qwen2() -> Path:
    return fm.build_tiny("qwen2")


@pytest.fixture(scope="session")
def tiny_mistral() -> Path:
    return fm.build_tiny("mistral")


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny_model(request) -> Path:
    """Parametrised over two architectures."""
    return fm.build_tiny(request.param)


@pytest.fixture(scope="session")
def code_models(tmp_path_factory, tiny_llama):
    """Copies of the tiny Llama that ship their own Python (fixtures_models.with_code): (native, custom, marker):
    ``native`` keeps model_type llama, ``custom`` is x_llama (only its code defines it); each of their .py files
    appends its name to ``marker`` when imported."""
    root = tmp_path_factory.mktemp("code")
    marker = root / "MARKER"
    native = fm.with_code(tiny_llama, root / "native-code", marker, native=True)
    custom = fm.with_code(tiny_llama, root / "custom-code", marker, native=False)
    return native, custom, marker


@pytest.fixture(scope="session")
def calibration_text() -> str:
    return fm.calibration_text()


@pytest.fixture(scope="session")
def eval_text() -> str:
    from quantkit.texts import builtin_eval_text

    return builtin_eval_text()


@pytest.fixture()
def run_cli():
    """Run the real CLI entry point in-process; returns (exit_code, stdout, stderr)."""
    import contextlib
    import io

    from quantkit.cli import main

    def _run(*args):
        code = 0
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main([str(a) for a in args])
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        return code, out.getvalue(), err.getvalue()

    return _run


@pytest.fixture()
def run_cli_subprocess():
    """Run ``python -m quantkit.cli`` in a child process (real exit code, real stderr)."""
    import subprocess

    def _run(*args, env=None, timeout=1800):
        r = subprocess.run([sys.executable, "-m", "quantkit.cli", *map(str, args)], capture_output=True,
                           text=True, env={**os.environ, **(env or {})}, timeout=timeout)
        return r.returncode, r.stdout, r.stderr

    return _run


# ------------------------------------------------------------------------------------ local Hub (card/push area)
@pytest.fixture(scope="session")
def _hub_server_session():
    from hubserver import HubServer

    with HubServer() as hub:
        yield hub


class HubFixture:
    """What ``hub_server`` gives a test: the running server plus shortcuts.

    ``endpoint``, ``token`` (alice's write token, also in ``HF_TOKEN``), ``user`` ("alice"), ``org``
    ("alice-org", alice is a member), ``add_user(name, orgs=(), role="write") -> token``,
    ``seed(repo_id, folder=None, files={path: bytes}, private=False, gated=False) -> commit sha``,
    ``grant(repo_id, user)``, ``fail_next(op, status=400, times=1)``, ``counts``, ``files(repo_id)``,
    ``head(repo_id)``, ``server`` (the :class:`hubserver.HubServer`), ``hf_home``.
    """

    def __init__(self, server, hf_home):
        self.server = server
        self.endpoint = server.endpoint
        self.hf_home = hf_home
        self.user, self.org = "alice", "alice-org"
        self.token = server.add_user(self.user, orgs=[self.org])

    def __getattr__(self, name):
        return getattr(self.server, name)


@pytest.fixture()
def hub_server(_hub_server_session, tmp_path, monkeypatch):
    """A fresh, empty local Hub for this test, with huggingface_hub pointed at it (env + live constants).

    Sets HF_ENDPOINT, HF_HUB_DISABLE_XET=1, a fresh HF_HOME (so no real login or cache leaks in), HF_TOKEN
    (alice's write token); works for in-process calls and for subprocesses (they inherit the environment).
    """
    from huggingface_hub import constants

    hub = _hub_server_session
    hub.reset()
    hf_home = tmp_path / "hf_home"
    hf_home.mkdir()
    fx = HubFixture(hub, hf_home)
    env = {"HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(hf_home),
           "HF_HUB_CACHE": str(hf_home / "hub"), "HF_TOKEN": fx.token, "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_HUB_DISABLE_IMPLICIT_TOKEN": "", "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_UPDATE_CHECK": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_STORED_TOKENS_PATH", "HF_XET_CACHE",
              "HF_ASSETS_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(k, raising=False)
    # huggingface_hub reads these once at import: patch the live values too, for in-process calls.
    patches = {
        "ENDPOINT": hub.endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub"),
        "HUGGINGFACE_HUB_CACHE": str(hf_home / "hub"), "HF_ASSETS_CACHE": str(hf_home / "assets"),
        "HF_TOKEN_PATH": str(hf_home / "token"), "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
        "HF_XET_CACHE": str(hf_home / "xet"), "HF_HUB_DISABLE_XET": True, "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
    }
    for k, v in patches.items():
        if hasattr(constants, k):
            monkeypatch.setattr(constants, k, v)
    # The module-level HfApi behind huggingface_hub's top-level functions (get_safetensors_metadata, ...) took
    # its endpoint at import, which may have happened before this fixture (e.g. through transformers).
    from huggingface_hub import hf_api

    monkeypatch.setattr(hf_api.api, "endpoint", hub.endpoint)
    yield fx


def use_users_vllm(mp: pytest.MonkeyPatch):
    """vLLM as the user has it (QUANTKIT_VLLM as set outside the tests, else the managed environment that
    scripts/install.sh makes); fails when there is none: the README's test command installs it."""
    from quantkit import vllm

    if VLLM_SETTING and VLLM_SETTING != "off":
        mp.setenv("QUANTKIT_VLLM", VLLM_SETTING)
    else:
        mp.delenv("QUANTKIT_VLLM", raising=False)
    inst, why = vllm.find_vllm()
    if inst is None:
        pytest.fail(f"no vLLM for the serving tests: {why}")
    return inst


@pytest.fixture()
def vllm_on(monkeypatch):
    return use_users_vllm(monkeypatch)
