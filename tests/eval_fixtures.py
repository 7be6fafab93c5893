"""GGUF variants of SmolLM2-135M for the eval/bench tests, built once and cached under the test cache.

Made with quantkit.gguf.quantize_gguf (a quantkit output folder with quantkit.json); if that module is not
there, with llama.cpp's converter + llama_model_quantize directly and a hand-written manifest.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import fixtures_models as fm
import pytest

TYPES = ["Q8_0", "Q4_K_M", "Q2_K"]
SET_VERSION = "1"


def gguf_path(folder: Path, gtype: str) -> Path:
    from quantkit.manifest import Manifest

    m = Manifest.load(folder, create=False)
    for rec in m.artifacts.values():
        if rec.get("type") == gtype:
            return folder / rec["path"]
    raise KeyError(gtype)


def _manual(hf: Path, folder: Path, types: list[str]) -> None:
    import llama_cpp

    from quantkit import llamacpp
    from quantkit.hub import resolve_model
    from quantkit.manifest import Manifest, file_record

    src = llamacpp.ensure_sources()
    f32 = folder / ".quantkit-work" / "f32.gguf"
    f32.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(hf), "--outtype", "f32",
                    "--outfile", str(f32)], env=llamacpp.converter_env(), check=True, capture_output=True)
    m = Manifest(folder)
    m.set_base(**resolve_model(str(hf)).manifest_base())
    for t in types:
        out = folder / f"SmolLM2-{t}.gguf"
        p = llama_cpp.llama_model_quantize_default_params()
        p.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{t}")
        assert llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), ctypes.byref(p)) == 0
        m.set_artifact(out.stem, {"path": out.name, "format": "gguf", "method": "gguf", "type": t,
                                  "files": [file_record(folder, out)], "size": out.stat().st_size})
    m.save()


def build_gguf_set(hf: Path, name: str = "smollm2-gguf-set", types=TYPES, calibration: str | None = None) -> Path:
    final = fm.TEST_CACHE / f"{name}-v{SET_VERSION}"
    if (final / "quantkit.json").is_file():
        return final
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=fm.TEST_CACHE))
    try:
        from quantkit.gguf import quantize_gguf
    except ImportError:
        quantize_gguf = None
    try:
        if quantize_gguf is not None:
            quantize_gguf(str(hf), list(types), tmp, calibration=calibration, threads=2)
        else:
            assert calibration is None, "imatrix variants need quantkit.gguf"
            _manual(hf, tmp, list(types))
        shutil.rmtree(tmp / ".quantkit-work", ignore_errors=True)  # the F32 intermediate is not needed
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return fm._publish_dir(tmp, final)


@pytest.fixture(scope="session")
def smollm2_gguf_set(smollm2_hf) -> Path:
    """Folder with SmolLM2-135M Q8_0 / Q4_K_M / Q2_K GGUFs + quantkit.json (cached between runs)."""
    return build_gguf_set(smollm2_hf)
