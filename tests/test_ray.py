"""quantkit run --ray on a real two-node Ray cluster on this machine (ray.cluster_utils.Cluster, CPU only, one
CPU per node, a logical GPU on the second node for placement): byte-identical artifacts to the sequential run,
a killed worker ends in a completed run with no stage done twice, a variant no node can hold fails up front."""

import hashlib
import json
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from quantkit.cluster import MARKER, run_on_ray, variant_resources  # noqa: E402
from quantkit.errors import QuantkitError  # noqa: E402
from quantkit.pipeline import RUN_LOG, run_recipe  # noqa: E402
from quantkit.recipe import load_recipe  # noqa: E402

GiB = 1 << 30


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    node = {"num_cpus": 1, "object_store_memory": 100 * 2**20, "memory": 6 * GiB}
    c = Cluster(initialize_head=True, connect=True, head_node_args={**node, "include_dashboard": False})
    c.add_node(**node, num_gpus=1)
    c.wait_for_nodes()
    yield c
    ray.shutdown()
    c.shutdown()


def recipe(tmp_path: Path, model, name: str, out: Path, types=("Q8_0", "Q4_K_M"), extra: str = "") -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(f"""\
quantkit: 1
model: {model}
out: {out}
variants:
  - method: gguf
    types: [{', '.join(types)}]
eval:
  ctx: 128
  max_tokens: 256
  max_kld: 0.5
  bench:
    enabled: false
publish:
  enabled: false
{extra}""")
    return p


def events(out: Path) -> list[dict]:
    return json.loads((out / RUN_LOG).read_text())["events"]


def done_counts(out: Path) -> Counter:
    return Counter(e["stage"] for e in events(out) if e["event"] == "done")


def ggufs(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*.gguf")) if "/." not in p.relative_to(out).as_posix()}


def test_two_recipes_on_two_nodes_match_the_sequential_run(tmp_path, cluster, tiny_llama, tiny_mistral):
    # (Mistral, a 32k SentencePiece vocabulary, rather than Qwen2's 151k: the same mechanics, a third of the time;
    # two types for Llama, one for Mistral: three variant tasks on two one-CPU nodes)
    seq, par = tmp_path / "seq", tmp_path / "ray"
    models = ((tiny_llama, "llama", ("Q8_0", "Q4_K_M")), (tiny_mistral, "mistral", ("Q4_K_M",)))
    for model, name, types in models:
        res = run_recipe(recipe(tmp_path, model, f"{name}-seq", seq / name, types=types))
        assert res.exit_code == 0, res.table()
    paths = [str(recipe(tmp_path, m, f"{n}-ray", par / n, types=t)) for m, n, t in models]
    run = run_on_ray(paths, cluster.address)
    assert run.exit_code == 0, "\n".join(r.table() for r in run.results)
    assert [[(v.name, v.status) for v in r.variants] for r in run.results] == [
        [("Q8_0", "done"), ("Q4_K_M", "done")], [("Q4_K_M", "done")]]
    assert all(v.eval and v.eval.kld_mean is not None for r in run.results for v in r.variants)
    assert all(r.report for r in run.results)  # report and cards ran on the driver
    for _, name, types in models:
        want, got = ggufs(seq / name), ggufs(par / name)
        assert len([k for k in want if any(t in k for t in types)]) == len(types)
        assert got == want  # byte-identical artifacts (and intermediates) to the sequential run
        counts = done_counts(par / name)
        assert counts["quantize:Q4_K_M"] == counts["eval:Q4_K_M"] == 1 and all(n == 1 for n in counts.values())
        started = [e for e in events(par / name) if e["event"] == "started" and ":Q" in e["stage"]]
        assert started and all(e.get("node") for e in started)  # stages ran in the workers, not the driver
        assert list((par / name).glob("*/README.md"))  # the card
        assert not (par / name / MARKER).exists()
    # two recipes, one CPU per node: both nodes did work
    nodes = {e["node"] for n in ("llama", "mistral") for e in events(par / n) if e.get("node")}
    assert len(nodes) == 2, nodes


def test_gptq_on_ray_is_the_same_bytes_as_sequential(tmp_path, cluster, code_models):
    """A Ray task runs with OMP_NUM_THREADS=1, which used to change torch's thread count and with it GPTQ's
    weights (29 of 62 tensors differed); quantkit sets torch's threads itself and records them. The model ships
    its own Python (a native Llama with `auto_map` -> modeling_x.py, which GPTQModel used to import whatever
    `trust_remote_code` said): neither run imports it, and a model that needs its code is refused up front."""
    native, custom, marker = code_models
    marker.unlink(missing_ok=True)
    text = f"""\
quantkit: 1
model: {native}
out: OUT
variants:
  - method: gptq
    bits: 4
    group_size: 32
    format: classic
calibration:
  samples: 8
  seq_len: 64
eval:
  enabled: false
publish:
  enabled: false
"""
    seq, par = tmp_path / "seq", tmp_path / "ray"
    for out in (seq, par):
        (tmp_path / f"{out.name}.yaml").write_text(text.replace("OUT", str(out)))
    assert run_recipe(str(tmp_path / "seq.yaml")).exit_code == 0
    run = run_on_ray([str(tmp_path / "ray.yaml")], cluster.address)
    assert run.exit_code == 0, "\n".join(r.table() for r in run.results)

    def weights(out):
        (folder,) = [p for p in out.iterdir() if (p / "quantkit-recipe.json").is_file()]
        return ({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.glob("*.safetensors")},
                json.loads((folder / "quantkit-recipe.json").read_text()))

    (w_seq, r_seq), (w_par, r_par) = weights(seq), weights(par)
    assert w_seq and w_par == w_seq
    assert r_par["threads"] == r_seq["threads"] >= 1 and "threads" in r_seq["reproducible"]
    assert not marker.exists(), marker.read_text()
    (tmp_path / "custom.yaml").write_text(text.replace("OUT", str(tmp_path / "custom")).replace(str(native),
                                                                                                 str(custom)))
    with pytest.raises(QuantkitError, match=r"needs its own Python code .*modeling_x\.py.*--trust-remote-code"):
        run_on_ray([str(tmp_path / "custom.yaml")], cluster.address)
    assert not marker.exists(), marker.read_text()


def _worker_of(variant: str, stage: str, out: Path, timeout: float = 300):
    """The Ray worker process whose subprocess is running ``stage`` of ``variant`` (once the run log says so)."""
    import psutil

    end = time.time() + timeout
    while time.time() < end:
        try:
            ev = events(out)
        except (OSError, json.JSONDecodeError):
            ev = []
        if any(e["stage"] == f"{stage}:{variant}" and e["event"] == "started" for e in ev):
            for p in psutil.process_iter(["cmdline"]):
                cmd = p.info["cmdline"] or []
                if "--part" in cmd and "variants" in cmd and variant in cmd:
                    return p.parent()
        time.sleep(0.05)
    raise AssertionError(f"{stage}:{variant} never started")


def test_killed_worker_is_retried_and_resumes(tmp_path, cluster, tiny_llama):
    out = tmp_path / "out"
    path = recipe(tmp_path, tiny_llama, "kill", out, types=("Q8_0",))
    got = {}
    t = threading.Thread(target=lambda: got.update(run=run_on_ray([str(path)], cluster.address)))
    t.start()
    worker = _worker_of("Q8_0", "eval", out)
    os.kill(worker.pid, signal.SIGKILL)  # the node "loses" the task mid-eval
    t.join(600)
    run = got["run"]
    assert run.exit_code == 0, run.results[0].table()
    ev = [e for e in events(out) if e["stage"] in ("quantize:Q8_0", "eval:Q8_0")]
    assert [e["event"] for e in ev if e["stage"] == "eval:Q8_0"][:2] == ["started", "started"]
    assert "cached" in [e["event"] for e in ev if e["stage"] == "quantize:Q8_0"]  # the retry resumed
    assert all(n == 1 for n in done_counts(out).values()), done_counts(out)  # no stage done twice


def test_variant_no_node_can_hold_fails_up_front(tmp_path, cluster):
    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "config.json").write_text((Path(__file__).parent / "data" / "llama-3.3-70b-instruct.config.json")
                                        .read_text())
    r = tmp_path / "big.yaml"
    r.write_text(f"quantkit: 1\nmodel: {folder}\nout: {tmp_path / 'o'}\nvariants:\n  - method: awq\n")
    with pytest.raises(QuantkitError, match=r"needs 1 CPU, 2 GPU and 143.3 GB RAM .*no node of the cluster"):
        run_on_ray([str(r)], cluster.address)
    assert not (tmp_path / "o").exists()  # nothing pulled, nothing written


def test_gpu_variant_is_placed_on_the_gpu_node(cluster, tiny_llama, tmp_path):
    from quantkit.plan import plan

    r = tmp_path / "g.yaml"
    r.write_text(f"quantkit: 1\nmodel: {tiny_llama}\nout: {tmp_path / 'o'}\nvariants:\n  - method: gptq\n"
                 "  - method: gguf\n    types: [Q8_0]\n")
    p = plan(str(tiny_llama))
    gptq, gguf = (variant_resources(p, v, cluster_gpus=1) for v in load_recipe(r).variants)
    assert gptq["num_gpus"] == 1 and "num_gpus" not in gguf and gptq["memory"] == p.needs["gptq"].ram_bytes
    assert "num_gpus" not in variant_resources(p, load_recipe(r).variants[0], cluster_gpus=0)
    gpu_node = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU"))
    where = ray.remote(lambda: ray.get_runtime_context().get_node_id())
    assert {ray.get(where.options(**gptq).remote()) for _ in range(3)} == {gpu_node}


def test_storage_a_node_cannot_see_stops_with_the_path(cluster, tmp_path):
    from quantkit.cluster import check_storage

    check_storage(ray, [str(tmp_path)])
    with pytest.raises(QuantkitError, match=r"cannot see .*nowhere.*HF_HOME"):
        check_storage(ray, [str(tmp_path / "nowhere")])


def test_a_ctrl_c_that_ray_swallows_still_stops_the_driver(tmp_path, tiny_llama):
    """The window the flaky run showed: a SIGINT arrives while the driver is inside a Ray call that turns the
    KeyboardInterrupt into a status of its own and returns normally (here a stand-in for ray.wait that does
    exactly that). The driver must still cancel the running task and stop with the interrupted line."""
    from quantkit.cluster import Job, _schedule

    r = load_recipe(recipe(tmp_path, tiny_llama, "swallow", tmp_path / "out", types=("Q8_0",)))
    cancelled, waits = [], []

    class Task:
        def options(self, **kw):
            return self

        def remote(self, *args):
            return "ref-1"

    class FakeRay:
        def remote(self, **kw):
            return lambda fn: Task()

        def wait(self, refs, num_returns, timeout):
            waits.append(1)
            assert len(waits) == 1, "the driver went on waiting after the Ctrl-C"
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.1)  # the handler runs here, inside the call
            except KeyboardInterrupt:
                pass  # swallowed, as Ray's check_signals does with its Interrupted status
            return [], refs

        def cancel(self, ref, force):
            cancelled.append((ref, force))

    fake = FakeRay()
    job = Job(r, r.variants[0], {"num_cpus": 1})
    with pytest.raises(QuantkitError, match="interrupted: cancelled 1 running variant task"):
        _schedule(fake, [job], [], retries=0)
    assert cancelled == [("ref-1", True)]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the driver's own handler is back


@pytest.mark.parametrize("stage,sig", [("quantize", signal.SIGINT), ("eval", signal.SIGINT),
                                       ("eval", signal.SIGTERM)], ids=lambda v: getattr(v, "name", v))
def test_a_cancel_on_the_driver_cancels_the_tasks(tmp_path, cluster, tiny_llama, stage, sig):
    """SIGINT (Ctrl-C) or SIGTERM (how CI runners and Kubernetes cancel) to `quantkit run --ray` while a worker
    runs the variant's quantize or eval stage: exit 128 + the signal with the one cancelled line last (after a
    SIGTERM Ray's own driver handler used to exit 1 with a C++ stack dump), the task's worker and its quantkit
    subprocess gone; then the same command completes, doing only what was left (after the eval drill quantize is
    not done again)."""
    import subprocess
    import sys

    import psutil

    out = tmp_path / "out"
    path = recipe(tmp_path, tiny_llama, "int", out, types=("Q8_0",))
    if stage == "eval":  # long enough that the signal lands inside it: 4k tokens
        path.write_text(path.read_text().replace("max_tokens: 256", "max_tokens: 4096"))
    cmd = [sys.executable, "-m", "quantkit.cli", "run", str(path), "--ray", cluster.address]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        worker = _worker_of("Q8_0", stage, out)
        stage_proc = worker.children()
        p.send_signal(sig)
        _, err = p.communicate(timeout=120)
    finally:
        p.kill()
    how = "interrupted" if sig == signal.SIGINT else "cancelled by SIGTERM"
    last = err.strip().splitlines()[-1]
    assert p.returncode == 128 + sig and last == f"error: {how}: cancelled 1 running variant task(s); run again " \
        "to resume from the stage keys", err[-2000:]
    assert "Traceback" not in err and "logging.cc" not in err and "(unknown)" not in err
    gone, alive = psutil.wait_procs(stage_proc + [worker], timeout=30)
    assert not alive  # the task's worker and its quantkit subprocess are gone
    assert not (out / MARKER).exists()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)  # the same command completes
    assert r.returncode == 0, r.stderr[-2000:]
    assert done_counts(out)["quantize:Q8_0"] == 1 and done_counts(out)["eval:Q8_0"] == 1
