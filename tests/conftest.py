import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("QUANTKIT_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import fixtures_models as fm  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_hf() -> Path:
    """SmolLM2-135M-Instruct as an HF folder (fp32 safetensors + tokenizer + licence card), cached."""
    return fm.build_smollm2_hf()


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
