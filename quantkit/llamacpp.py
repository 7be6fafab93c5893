"""Where llama.cpp's own code lives on this machine.

* The C library (quantiser, imatrix struct, kernels) comes from ``llama-cpp-python``, compiled from its sdist
  at install time (PyPI has no binary wheel).
* The HF -> GGUF converter (``convert_hf_to_gguf.py`` + ``conversion/`` + its own ``gguf-py``) is not in that
  wheel, but the *same sdist* vendors it from the same llama.cpp commit. :func:`ensure_sources` fetches that
  sdist once with pip (exactly the installed version), and unpacks the Python side into quantkit's cache. The
  converter runs in a subprocess with its own ``gguf-py`` first on ``PYTHONPATH``: PyPI's ``gguf`` 0.19.0 has the
  same version label but older code and breaks the converter.
* The optional ``llama-*`` tools (llama-quantize, llama-perplexity, ...) are installed next to the library when
  it was built with ``-DLLAMA_BUILD_TOOLS=ON -DLLAMA_TOOLS_INSTALL=ON`` (scripts/install.sh does); only the
  benchmarks use them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from quantkit.errors import QuantkitError
from quantkit.util import cache_home, dist_version

DIST = "llama-cpp-python"
# What we unpack from the sdist's vendor/llama.cpp: the converter and what it imports, the vocab-only
# GGUFs (real tokenizers, used by tests) and llama.cpp's licence. LAYOUT names what was kept: bump it when
# _KEEP changes, so an older unpacked folder (shared by other checkouts) is left alone and a new one made.
LAYOUT = "2"
_KEEP = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/", "models/ggml-vocab-",
         "LICENSE", "requirements/")


def version() -> str:
    v = dist_version(DIST)
    if not v:
        raise QuantkitError("llama-cpp-python is not installed: run scripts/install.sh (it compiles llama.cpp, "
                            "~10 min once)")
    return v


def sources_dir() -> Path:
    """Folder holding the vendored llama.cpp Python sources for the installed llama-cpp-python."""
    override = os.environ.get("QUANTKIT_LLAMA_CPP_DIR")
    if override:
        return Path(override)
    return cache_home() / f"llama.cpp-{version()}-l{LAYOUT}"


def ensure_sources(quiet: bool = False) -> Path:
    """Return the vendored llama.cpp folder, fetching the matching sdist with pip the first time."""
    dest = sources_dir()
    if (dest / "convert_hf_to_gguf.py").is_file():
        return dest
    if os.environ.get("QUANTKIT_LLAMA_CPP_DIR"):
        raise QuantkitError(f"QUANTKIT_LLAMA_CPP_DIR={dest} has no convert_hf_to_gguf.py")
    ver = version()
    with tempfile.TemporaryDirectory(prefix="quantkit-sdist-") as tmp:
        if not quiet:
            print(f"fetching llama.cpp's converter from the {DIST}=={ver} sdist (once)...", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
               f"{DIST}=={ver}", "-d", tmp]
        r = subprocess.run(cmd, capture_output=True, text=True)
        tars = list(Path(tmp).glob("*.tar.gz"))
        if r.returncode != 0 or not tars:
            tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
            raise QuantkitError(f"could not fetch the {DIST}=={ver} sdist for llama.cpp's converter ({tail[0]}); "
                                "check network access to the package index, or set QUANTKIT_LLAMA_CPP_DIR "
                                "to an unpacked llama.cpp tree")
        staging = Path(tempfile.mkdtemp(prefix=".llama.cpp-", dir=dest.parent))
        try:
            with tarfile.open(tars[0]) as tf:
                for m in tf.getmembers():
                    parts = m.name.split("/", 3)
                    # <sdist>/vendor/llama.cpp/<rel>
                    if len(parts) < 4 or parts[1:3] != ["vendor", "llama.cpp"]:
                        continue
                    rel = parts[3]
                    if not rel.startswith(_KEEP) or not (m.isfile() or m.isdir()):
                        continue
                    m.name = rel
                    tf.extract(m, staging, filter="data")
            if not (staging / "convert_hf_to_gguf.py").is_file():
                raise QuantkitError(f"the {DIST}=={ver} sdist has no vendor/llama.cpp/convert_hf_to_gguf.py")
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(staging, dest)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return dest


def converter_env() -> dict:
    """Environment for running the converter: its own gguf-py ahead of anything installed."""
    src = ensure_sources()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(src / "gguf-py"), str(src)] +
                                        ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("NO_LOCAL_GGUF", "")
    return env


def vocab_file(name: str) -> Path:
    """A vocab-only GGUF shipped with llama.cpp, e.g. ``vocab_file("qwen2")`` (real tokenizers for tests)."""
    p = ensure_sources() / "models" / f"ggml-vocab-{name}.gguf"
    if not p.is_file():
        have = sorted(x.name[len("ggml-vocab-"):-5] for x in p.parent.glob("ggml-vocab-*.gguf"))
        raise QuantkitError(f"no vocab {name!r} in llama.cpp's models/ (have: {', '.join(have)})")
    return p


def tools_dir() -> Path | None:
    """Folder with llama.cpp's command-line tools (llama-quantize, llama-perplexity, ...), if they were built."""
    import llama_cpp

    site = Path(llama_cpp.__file__).resolve().parent.parent
    for cand in (site / "bin", Path(sys.prefix) / "bin"):
        if (cand / "llama-quantize").exists():
            return cand
    return None


def tool(name: str) -> tuple[Path, dict]:
    """Path of a llama.cpp tool and the environment to run it with (its libs have no RPATH)."""
    d = tools_dir()
    if d is None:
        raise QuantkitError(f"{name} was not built: re-install llama-cpp-python with scripts/install.sh "
                            "(CMAKE_ARGS with -DLLAMA_BUILD_TOOLS=ON -DLLAMA_TOOLS_INSTALL=ON)")
    import llama_cpp

    lib = Path(llama_cpp.__file__).resolve().parent / "lib"
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(lib), str(d.parent / "lib"),
                                                           env.get("LD_LIBRARY_PATH")]))
    return d / name, env
