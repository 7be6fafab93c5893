"""Output folders shared between processes: quantkit.json and the run log merge under an OS lock.

Real concurrent processes (never threads): each writes its own records into one folder at the same moment, and
every record must be on disk afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from quantkit.manifest import Manifest
from quantkit.util import merge_json_into

ROOT = Path(__file__).resolve().parent.parent


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def _start_together(script: str, n: int, tmp: Path, *args) -> None:
    """Run ``n`` copies of ``script`` that all wait for one go file, then check they all succeeded."""
    go = tmp / "go"
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), str(go), str(i), *map(str, args)],
                              env=_env(), stderr=subprocess.PIPE, text=True) for i in range(n)]
    time.sleep(1.5)  # every child imported and is spinning on the go file
    go.write_text("go")
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err


WAIT = """
import os, sys, time
go, me = sys.argv[1], int(sys.argv[2])
while not os.path.exists(go):
    time.sleep(0.001)
"""


def test_manifest_saves_from_concurrent_processes_keep_every_record(tmp_path):
    folder = tmp_path / "out"
    m = Manifest(folder)
    m.set_base(id="acme/x", sha="a" * 40)
    m.save()
    script = WAIT + """
from quantkit.manifest import Manifest
folder = sys.argv[3]
for k in range(15):
    m = Manifest.load(folder)                  # read ...
    m.set_artifact(f"p{me}-{k}", {"path": f"p{me}-{k}.gguf", "files": []})
    m.log("test", who=me, k=k)
    time.sleep(0.002)                          # ... let the others write meanwhile ...
    m.save()                                   # ... write
"""
    _start_together(script, 4, tmp_path, folder)
    m = Manifest.load(folder)
    assert sorted(m.artifacts) == sorted(f"p{i}-{k}" for i in range(4) for k in range(15))
    assert len([h for h in m.data["history"] if h["stage"] == "test"]) == 60
    assert m.base["id"] == "acme/x"
    assert not list(folder.glob("*.partial"))


def test_runlog_saves_from_concurrent_processes_keep_every_event(tmp_path):
    script = WAIT + """
from pathlib import Path
from quantkit.pipeline import RunLog
out = Path(sys.argv[3])
for k in range(15):
    log = RunLog(out)
    time.sleep(0.002)
    log.event(f"quantize:T{me}-{k}", "done", key=f"{me}-{k}")
"""
    _start_together(script, 3, tmp_path, tmp_path)
    data = json.loads((tmp_path / "quantkit-run.json").read_text())
    assert len(data["events"]) == 45
    assert sorted(data["stages"]) == sorted(f"quantize:T{i}-{k}" for i in range(3) for k in range(15))


def test_merge_keeps_both_sides_changes():
    base = {"artifacts": {"a": {"size": 1}, "b": {"size": 2}}, "history": [1], "pushes": [], "x": 1}
    theirs = {"artifacts": {"a": {"size": 1, "eval": {"kld": 0.1}}, "b": {"size": 2}, "c": {"size": 3}},
              "history": [1, 2], "pushes": [], "x": 1}
    ours = {"artifacts": {"a": {"size": 1}, "d": {"size": 4}}, "history": [1, 3], "pushes": [], "x": 5}
    keep = ours["artifacts"]
    merge_json_into(ours, base, theirs)
    assert ours["artifacts"] is keep  # references held by callers stay valid
    assert ours == {"artifacts": {"a": {"size": 1, "eval": {"kld": 0.1}}, "c": {"size": 3}, "d": {"size": 4}},
                    "history": [1, 2, 3], "pushes": [], "x": 5}  # b: deleted by us; c: added by them


def test_rebuilt_artifact_drops_a_stale_measurement_written_meanwhile(tmp_path):
    m = Manifest(tmp_path)
    m.set_artifact("A", {"path": "A.gguf", "size": 1})
    m.save()
    mine = Manifest.load(tmp_path)
    other = Manifest.load(tmp_path)
    other.update_artifact("A", eval={"kld": 0.5})  # measured on the old file
    other.save()
    mine.set_artifact("A", {"path": "A.gguf", "size": 2})  # rebuilt meanwhile
    mine.save()
    assert Manifest.load(tmp_path).artifact("A")["size"] == 2
    assert "eval" not in Manifest.load(tmp_path).artifact("A")


def test_update_holds_the_lock_for_the_whole_read_modify_write(tmp_path):
    Manifest(tmp_path).save()
    script = WAIT + """
from quantkit.manifest import Manifest
for k in range(10):
    with Manifest.update(sys.argv[3]) as m:
        n = m.data.setdefault("counter", 0)
        time.sleep(0.002)
        m.data["counter"] = n + 1               # a counter only stays exact when nobody writes in between
"""
    _start_together(script, 3, tmp_path, tmp_path)
    assert Manifest.load(tmp_path).data["counter"] == 30


def test_two_gguf_commands_on_one_folder_record_every_type(tiny_llama, tmp_path):
    """The issue's measurement: two `quantkit gguf` runs at once on one --out used to leave two of four records."""
    out = tmp_path / "shared"
    procs = [subprocess.Popen([sys.executable, "-m", "quantkit.cli", "gguf", str(tiny_llama), "--types", types,
                               "--out", str(out), "--threads", "1", "--json"], env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for types in ("Q8_0,Q4_K_M", "Q5_K_M,Q6_K")]
    results = []
    for p in procs:
        so, se = p.communicate(timeout=900)
        assert p.returncode == 0, se
        results.append(json.loads(so))
    m = Manifest.load(out)
    types = sorted(rec["type"] for rec in m.artifacts.values())
    assert types == ["Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"]
    assert all(m.artifact_is_intact(name) for name in m.artifacts)
    # the intermediate was converted once: the second process waited for the first and re-used its file
    assert len([h for h in m.data["history"] if h["stage"] == "gguf.convert"]) == 1
    assert sum(r["converted"] for r in results) == 1
