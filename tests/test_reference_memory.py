"""The streamed reference's peak memory, measured in child processes (issue 24 item 0): one block at a time, not
the model. Not in the unit tier (test_reference.py): two interpreters load torch and transformers, ~30 s, so it runs
beside the other default tests instead of before them."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import fixtures_models as fm
import pytest

_PEAK = textwrap.dedent("""
    import re, sys
    from pathlib import Path
    import accelerate, torch  # noqa: F401 - the runtime, measured before the model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401
    from quantkit.engines.hf import HFSession
    from quantkit.engines.hf_stream import StreamedSession

    def rss(key):
        return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024

    runtime = rss("VmRSS")
    s = (StreamedSession if sys.argv[1] == "streamed" else HFSession)(Path(sys.argv[2]), 2)
    logits = next(iter(s.score_windows([list(range(100, 356))])))
    print("PEAK", runtime, rss("VmHWM"), float(logits.double().abs().sum()))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_streamed_reference_peak_memory_is_a_block_not_the_model(tmp_path):
    """Peak RSS above the runtime, measured in a child process on a 10-layer model (0.65 GB in fp32, its
    largest block the 0.2 GB embedding): the whole model takes at least its fp32 size, the streamed reference
    under two of its largest block (the block in fp32 and its bf16 read; a layer leaked per step would add
    45 MB ten times), and both give the same logits."""
    path = fm.build_synthetic_llama(10, 1024)
    fp32 = sum(f.stat().st_size for f in path.glob("*.safetensors")) * 2
    script = tmp_path / "peak.py"
    script.write_text(_PEAK)

    def run(kind):
        r = subprocess.run([sys.executable, str(script), kind, str(path)], capture_output=True, text=True,
                           timeout=600)
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("PEAK")]
        assert line, r.stderr[-2000:]
        _, runtime, peak, total = line[-1].split()
        return int(peak) - int(runtime), float(total)

    whole, want = run("whole")
    streamed, got = run("streamed")
    assert whole >= fp32 * 0.95, (whole, fp32)
    block = 49152 * 1024 * 4  # the embedding (tied): vocab x hidden in fp32
    assert streamed < 2 * block, (streamed, block)
    assert abs(got - want) <= 1e-5 * want
