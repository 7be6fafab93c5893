"""``quantkit run`` of a small matrix sequentially versus ``--ray`` on a local two-node cluster, and Ray's fixed
overhead per task.

    python3 benchmarks/ray_fanout.py [--models llama,qwen2] [--types Q8_0,Q4_K_M] [--cpus-per-node 1] [--work DIR]

The matrix: one recipe per tiny 2-layer model of ``tests/fixtures_models.py`` (real tokenizers, random
weights), each with the GGUF ``--types`` and a short eval (ctx 128, 256 tokens, no bench). Both runs start from
empty output folders (the fixtures are built once beforehand and shared). The cluster is
``ray.cluster_utils.Cluster`` with two nodes of ``--cpus-per-node`` CPUs on this machine; its start is timed
apart from the run.

Overhead per task: (1) a no-op Ray task's round trip on that cluster (mean of 20, after a warm-up), and (2) a
variant task that finds every stage cached (a second ``--ray`` run over the finished folders: the subprocess
start, imports, key checks and the driver's folder pass), per variant. Prints a table and writes
``benchmarks/results/ray_fanout.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])  # the workers' quantkit

import fixtures_models as fm  # noqa: E402
from test_ray import recipe  # noqa: E402  (the tests' recipe: GGUF types, short eval, no bench, no push)

from quantkit.cluster import run_on_ray  # noqa: E402
from quantkit.pipeline import run_recipe  # noqa: E402
from quantkit.util import format_table  # noqa: E402

GiB = 1 << 30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="llama,qwen2")
    ap.add_argument("--types", default="Q8_0,Q4_K_M")
    ap.add_argument("--cpus-per-node", type=int, default=1)
    ap.add_argument("--work", type=Path, default=None)
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="ray-fanout-"))
    types = a.types.split(",")
    models = {m: fm.build_tiny(m) for m in a.models.split(",")}
    n_variants = len(models) * len(types)

    t = time.perf_counter()
    for m, path in models.items():
        res = run_recipe(recipe(work, path, f"{m}-seq", work / "seq" / m, types))
        assert res.exit_code == 0, res.table()
    sequential = time.perf_counter() - t

    import ray
    from ray.cluster_utils import Cluster

    t = time.perf_counter()
    node = {"num_cpus": a.cpus_per_node, "object_store_memory": 100 * 2**20, "memory": 6 * GiB}
    c = Cluster(initialize_head=True, connect=True, head_node_args={**node, "include_dashboard": False})
    c.add_node(**node)
    c.wait_for_nodes()
    start = time.perf_counter() - t
    try:
        noop = ray.remote(num_cpus=1)(lambda: None)
        ray.get([noop.remote() for _ in range(4)])
        t = time.perf_counter()
        for _ in range(20):
            ray.get(noop.remote())
        noop_s = (time.perf_counter() - t) / 20

        paths = [str(recipe(work, p, f"{m}-ray", work / "ray" / m, types)) for m, p in models.items()]
        t = time.perf_counter()
        run = run_on_ray(paths, c.address)
        on_ray = time.perf_counter() - t
        assert run.exit_code == 0, "\n".join(r.table() for r in run.results)
        t = time.perf_counter()
        run_on_ray(paths, c.address)
        cached = time.perf_counter() - t
    finally:
        ray.shutdown()
        c.shutdown()

    rows = [("sequential (quantkit run, one recipe after the other)", f"{sequential:.1f}"),
            (f"--ray, 2 nodes x {a.cpus_per_node} CPU", f"{on_ray:.1f}"),
            ("  cluster start (not in the line above)", f"{start:.1f}"),
            ("no-op Ray task round trip", f"{noop_s * 1000:.1f} ms"),
            (f"--ray re-run, all {n_variants} variants cached", f"{cached:.1f}"),
            ("  per cached variant task", f"{cached / n_variants:.1f}")]
    print(f"{len(models)} models x {len(types)} GGUF types ({', '.join(types)}) = {n_variants} variants, "
          f"{os.cpu_count()} CPUs on this machine")
    print(format_table(rows, ["run", "seconds"]))
    res = {"models": list(models), "types": types, "variants": n_variants, "cpus": os.cpu_count(),
           "cpus_per_node": a.cpus_per_node, "sequential_s": sequential, "ray_s": on_ray, "cluster_start_s": start,
           "noop_task_s": noop_s, "ray_all_cached_s": cached}
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "ray_fanout.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
