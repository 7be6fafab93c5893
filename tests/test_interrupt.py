"""Cancel drills for the commands that do the work: Ctrl-C (SIGINT) and the way CI runners, Kubernetes and Slurm
cancel (SIGTERM; SIGHUP when a terminal closes) to `quantkit gguf` while llama.cpp's converter runs, to
`quantkit gptq` / `quantkit awq` inside their engine's layer loop (gptqmodel, llm-compressor), to `quantkit eval`
while it scores the variant and to `quantkit bench` while its child measures. Each waits for that state (a child
process, a line the engine prints), not for a moment; then: exit 128 + the signal (130, 143, 129) within 60 s, the
one `error: interrupted: ...` / `error: cancelled by SIGTERM: ...` line, no traceback, nothing under a final name,
no child left; for gguf and eval the same command run again completes. (`run` during bench is drilled in
test_pipeline.py, `run --ray` in test_ray.py, a vLLM server in test_vllm.py.) The drills also pass from a parent
that ignores SIGINT (a suite started as a background job): the last test here runs one that way."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

INTERRUPTED = "error: interrupted: what was finished is kept"
CANCELLED = {signal.SIGINT: INTERRUPTED, signal.SIGTERM: "error: cancelled by SIGTERM: what was finished is kept",
             signal.SIGHUP: "error: cancelled by SIGHUP: what was finished is kept"}


def _env(progress: bool = False) -> dict:
    env = {**os.environ, "QUANTKIT_NO_PROGRESS": "1"}
    if progress:  # eval's only sign of scoring a variant is its progress bar
        env.pop("QUANTKIT_NO_PROGRESS")
    return env


def _cmdlines(procs) -> list[str]:
    out = []
    for k in procs:
        try:
            out.append(" ".join(k.cmdline()))
        except psutil.Error:  # gone already
            pass
    return out


def drill(args: list[str], *, line: str | None = None, child: str | None = None, env=None, timeout: float = 600,
          sig: int = signal.SIGINT):
    """Run ``quantkit ARGS``; once a stderr line matches ``line`` (or a child process's command line matches
    ``child``), send ``sig``. ``(exit code, seconds from the signal to exit, stderr, the children it had, their
    command lines, the signal)``."""
    def deliverable():  # nohup ignores SIGHUP, and an ignored signal stays ignored through exec
        signal.signal(sig, signal.SIG_DFL)

    p = subprocess.Popen([sys.executable, "-m", "quantkit.cli", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env or _env(), preexec_fn=deliverable)
    lines: list[str] = []
    ready = threading.Event()

    def read():
        for text in p.stderr:  # universal newlines: a progress bar's \r ends a line too
            lines.append(text)
            if line and re.search(line, text):
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    end = time.time() + timeout
    kids = []
    try:
        while p.poll() is None and time.time() < end and not ready.is_set():
            if child and any(re.search(child, c) for c in _cmdlines(psutil.Process(p.pid).children(recursive=True))):
                break
            time.sleep(0.05)
        assert p.poll() is None, "the command ended before the state the drill waits for:\n" + "".join(lines)[-3000:]
        assert time.time() < end, "the state the drill waits for never came:\n" + "".join(lines)[-3000:]
        kids = psutil.Process(p.pid).children(recursive=True)
        cmds = _cmdlines(kids)
        t0 = time.time()
        p.send_signal(sig)
        p.wait(timeout=120)
        took = time.time() - t0
    finally:
        p.kill()
    reader.join(timeout=10)
    return p.returncode, took, "".join(lines), kids, cmds, sig


def assert_interrupted(code: int, took: float, err: str, kids, _cmds=None, sig: int = signal.SIGINT) -> None:
    assert code == 128 + sig and took < 60, (code, took, err[-3000:])
    last = [s for s in err.strip().splitlines() if s.strip()][-1]
    assert last.startswith(CANCELLED[sig]), err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    _, alive = psutil.wait_procs(kids, timeout=30)
    assert not alive, alive


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_a_cancel_while_the_converter_runs_then_a_rerun_completes(tmp_path, tiny_llama, sig):
    out = tmp_path / "out"
    args = ["gguf", str(tiny_llama), "--types", "Q8_0", "--out", str(out)]
    assert_interrupted(*drill(args, child="convert_hf_to_gguf", sig=sig))  # while llama.cpp's converter runs
    assert not list(out.rglob("*.gguf")), list(out.rglob("*"))  # neither the intermediate nor a type
    r = subprocess.run([sys.executable, "-m", "quantkit.cli", "gguf", *args[1:]], env=_env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / f"{tiny_llama.name}-Q8_0.gguf").is_file() and "KLD" in r.stdout


@pytest.mark.parametrize("method,fmt,engine_line,sig", [
    ("gptq", "classic", r"Quantizing layer", signal.SIGINT),          # gptqmodel's per-layer loop (native threads)
    ("awq", "compressed-tensors", r"Grid search for", signal.SIGINT),  # llm-compressor's AWQ scale search
    ("awq", "classic", r"Quantizing layer|awq", signal.SIGTERM),
    ("gptq", "compressed-tensors", r"Quantizing|GPTQ|compress", signal.SIGTERM),
], ids=lambda v: getattr(v, "name", None))
def test_a_cancel_inside_the_engine_leaves_no_folder(tmp_path, tiny_llama, method, fmt, engine_line, sig):
    out, calib = tmp_path / "out", tmp_path / "calib.txt"
    calib.write_text("\n\n".join(f"Calibration paragraph {i}: " + "the quick brown fox jumps over the lazy dog. " * 20
                                   for i in range(8)))
    assert_interrupted(*drill([method, str(tiny_llama), "--calibration", str(calib), "--samples", "8", "--seq-len",
                               "128", "--group-size", "32", "--format", fmt, "--out", str(out)], line=engine_line,
                              sig=sig))
    assert not out.exists()  # the folder is built under a hidden temporary name and renamed when complete
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def tiny_q8(tmp_path_factory, tiny_llama) -> Path:
    from quantkit.gguf import quantize_gguf

    res = quantize_gguf(str(tiny_llama), ["Q8_0"], tmp_path_factory.mktemp("q8"), verify=False)
    return res.folder / res.manifest.artifacts[res.artifacts[0]]["path"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_a_cancel_while_eval_scores_the_variant_then_a_rerun_completes(tmp_path, tiny_llama, tiny_q8, sig):
    text = tmp_path / "text.txt"  # a text of its own: the base's reference is computed in this run
    text.write_text((Path(__file__).parent.parent / "README.md").read_text() + f"\n{tmp_path.name}\n")
    args = ["eval", str(tiny_llama), str(tiny_q8), "--text", str(text), "--ctx", "128", "--max-tokens", "1024"]
    # the base's windows are done and the variant's first window is scored (7 more to go)
    assert_interrupted(*drill(args, line=rf"{re.escape(tiny_q8.stem)} \(gguf\):.*\|\s*[1-9]\d*/\d+",
                              env=_env(progress=True), sig=sig))
    r = subprocess.run([sys.executable, "-m", "quantkit.cli", *args, "--json"], env=_env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(r.stdout)["variants"]
    assert [row["kld_mean"] is not None for row in rows if row["name"] == tiny_q8.stem] == [True], rows


def test_sigterm_while_bench_measures_stops_its_child(tmp_path, tiny_q8):
    """`quantkit bench` measures in a child process of its own: SIGTERM to quantkit alone (not its process group,
    as `kill` and Kubernetes send it) stops that child too, and nothing is written to the manifest."""
    before = (tiny_q8.parent / "quantkit.json").read_text()
    assert_interrupted(*drill(["bench", str(tiny_q8), "--no-base", "--gen-tokens", "256", "--repeats", "80"],
                              child="_child_main", sig=signal.SIGTERM))
    assert (tiny_q8.parent / "quantkit.json").read_text() == before


def test_the_drills_pass_when_the_suite_is_started_with_sigint_ignored(tmp_path):
    """A suite started as a background job (`nohup bash scripts/test.sh &`, some CI wrappers) runs with SIGINT
    ignored (nohup: SIGHUP too), and children inherit that through exec: a drill's signal would never arrive (9
    drills failed so). conftest.py handles SIGINT for the suite, and drill() gives its child the default action for
    the signal it sends; here two drills run in a pytest started the way `nohup ... &` starts it."""
    def as_nohup_in_the_background():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    test = f"{Path(__file__).name}::test_a_cancel_while_the_converter_runs_then_a_rerun_completes"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{test}[SIGINT]",
                        f"{test}[SIGHUP]"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=900,
                       preexec_fn=as_nohup_in_the_background)
    assert r.returncode == 0 and "2 passed" in r.stdout, (r.stdout + r.stderr)[-3000:]


def test_a_cancel_that_gets_stuck_unwinding_still_leaves():
    """Once in a run of the drills beside vLLM (not reproduced in 35 more tries, idle and loaded) `quantkit gptq`
    did not exit within 120 s of its Ctrl-C. Whatever holds a process while it unwinds (an engine's threads), the
    command's cancel handler starts a watchdog: past util.CANCEL_GRACE_S it leaves with the signal's exit code
    and says so. Here the unwinding blocks for ever and the grace is 2 s."""
    code = """
import threading, time
from quantkit import util
util.CANCEL_GRACE_S = 2
util.handle_cancel_signals()
try:
    print("ready", flush=True)  # inside the block: the signal may come as soon as this line is read
    time.sleep(60)
except KeyboardInterrupt:
    threading.Event().wait()  # a clean-up that never ends
"""
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    t0 = time.time()
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143 and 1.5 < time.time() - t0 < 30, (p.returncode, err)
    assert err.strip() == "error: not stopped 2 s after SIGTERM: leaving without the rest of the clean-up"
