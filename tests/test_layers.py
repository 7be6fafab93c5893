"""The imports of quantkit run one way: facts and helpers at the bottom, the engines above them, measurement above
the engines, quantisers, cards and publishing above that, the pipeline and the CLI on top. Read from the source
(every ``import``, at module level or inside a function), so a new import that closes a circle fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import quantkit

pytestmark = pytest.mark.unit

PKG = Path(quantkit.__file__).parent
ENGINE_MODULES = {"quantkit.engines", "quantkit.engines.llama_cpp", "quantkit.engines.hf", "quantkit.engines.hf_stream",
                  "quantkit.engines.served"}
#: what the engines may use: facts, errors, helpers (quantkit.trust: the user's consent for a model's own code),
#: and the GGUF / llama.cpp / vLLM code below them
BELOW_ENGINES = {"quantkit", "quantkit.errors", "quantkit.formats", "quantkit.util", "quantkit.texts",
                 "quantkit.trust", "quantkit.ggufio", "quantkit.llamacpp", "quantkit.vllm"} | ENGINE_MODULES
MEASUREMENT = {"quantkit.evaluate", "quantkit.verify", "quantkit.bench", "quantkit.tasks"}
ABOVE_MEASUREMENT = {"quantkit.card", "quantkit.report", "quantkit.publish", "quantkit.pipeline", "quantkit.cli",
                     "quantkit.recipe", "quantkit.cluster"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """module -> the quantkit modules it imports (``from quantkit import vllm`` counts as quantkit.vllm)."""
    mods = {_module_name(p): p for p in PKG.rglob("*.py")}
    out: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("quantkit"):
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    deps.add(sub if sub in mods else node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("quantkit")}
        out[name] = {d for d in deps if d != name}
    return out


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle():
    graph = _imports()
    circles = _circles(graph)
    detail = [[f"{a} -> {b}" for a in c for b in sorted(graph[a]) if b in c] for c in circles]
    assert not circles, detail


def test_the_circle_finder_finds_a_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_engines_import_nothing_above_them():
    graph = _imports()
    assert ENGINE_MODULES <= set(graph)
    up = {m: sorted(graph[m] - BELOW_ENGINES) for m in ENGINE_MODULES if graph[m] - BELOW_ENGINES}
    assert not up, up


def test_the_helpers_below_the_engines_use_only_facts():
    """quantkit.vllm (the server), quantkit.ggufio (GGUF files, llama.cpp's C calls), quantkit.llamacpp (where
    llama.cpp lives) and quantkit.trust (consent for a model's code) sit under the engines: facts, errors and util
    only."""
    graph = _imports()
    facts = {"quantkit", "quantkit.errors", "quantkit.formats", "quantkit.util", "quantkit.llamacpp", "quantkit.trust"}
    up = {m: sorted(graph[m] - facts) for m in ("quantkit.vllm", "quantkit.ggufio", "quantkit.llamacpp",
                                                  "quantkit.trust") if graph[m] - facts}
    assert not up, up


def test_measurement_imports_no_card_publish_or_pipeline():
    graph = _imports()
    up = {m: sorted(graph[m] & ABOVE_MEASUREMENT) for m in MEASUREMENT if graph[m] & ABOVE_MEASUREMENT}
    assert not up, up


def test_measurement_never_loads_a_model_itself():
    """evaluate, verify, bench and tasks reach llama.cpp, transformers' model classes and vLLM only through
    quantkit.engines (one interface), so none of them loads or serves a model of its own."""
    engine_calls = ("Llama(", "import llama_cpp", "from llama_cpp", "AutoModelForCausalLM", "vllm.server(",
                    "from quantkit import vllm", "from quantkit.vllm import server", "HFLM(", "LocalCompletionsAPI(")
    found = {m: [c for c in engine_calls if c in (PKG.parent / (m.replace(".", "/") + ".py")).read_text()]
             for m in MEASUREMENT}
    assert not {m: c for m, c in found.items() if c}, found
