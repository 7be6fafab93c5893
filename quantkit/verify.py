"""Verify on build: a variant is done only when its own engine loads it and it stays close to its base.

Right after ``quantkit gguf`` / ``awq`` / ``gptq`` write an artifact, :func:`verify_artifact` loads it in the
engine it is made for (llama.cpp for a GGUF; transformers with the format's kernel for classic AWQ/GPTQ and
compressed-tensors) and scores a short fixed prompt set against the base, with :mod:`quantkit.evaluate`'s own
machinery (token stream, cached base distribution, KLD estimator, scorers): the first ``VERIFY_TOKENS`` tokens
of the built-in evaluation text, one window. It passes when the artifact loads, its logits are all finite, and
its mean KL divergence to the base is under :func:`kld_bound` for its bit width: bounds that a healthy
quantisation never crosses (measured on SmolLM2-135M and the tiny test models; README, design: verify), far
below what a broken artifact scores (wrong or random weights: several nats).

The result (:class:`VerifyResult`) is recorded on the artifact in ``quantkit.json`` as ``verify``; a failed
check keeps the files (for inspection) but leaves them marked ``verify.passed: false``, and ``quantkit push``
refuses to publish an artifact without a passed check unless ``--allow-unverified`` (the card then says so).
"""

from __future__ import annotations

import functools
import math
import re
import sys
import time
from pathlib import Path

from quantkit import trust
from quantkit.errors import QuantkitError
from quantkit.records import VerifyResult
from quantkit.util import now_iso

#: Context of the verify window and the text tokens scored: one window at the start of the built-in evaluation
#: text, of which only the first VERIFY_CHARS characters are tokenised (far more than VERIFY_TOKENS need).
VERIFY_CTX = 256
VERIFY_TOKENS = 256
VERIFY_CHARS = 16 * VERIFY_TOKENS
#: Bound on the mean KLD (nats/token) to the base, by nominal bits per weight: the first row whose bits are at
#: most the artifact's applies. Healthy variants measure far below (README, design: verify).
KLD_BOUNDS: tuple[tuple[int, float], ...] = ((8, 0.05), (6, 0.15), (5, 0.3), (4, 0.75), (3, 1.0), (2, 2.0),
                                             (0, 4.0))


class VerifyFailed(QuantkitError):
    """An artifact was built but failed its check: the files stay, marked unverified."""

    exit_code = 1


def verify_status(record: dict) -> str:
    """The summary-table cell of an artifact record: its check's status, or "-" when it has none."""
    v = record.get("verify")
    return VerifyResult.from_json(v).status if isinstance(v, dict) else "-"


def gguf_bits(gtype: str) -> int:
    """Nominal bits of a llama.cpp type from its name: Q4_K_M -> 4, IQ2_XXS -> 2, MXFP4_MOE -> 4, F16 -> 16."""
    m = re.search(r"\d+", gtype)
    if not m:
        raise QuantkitError(f"cannot tell the bit width of GGUF type {gtype!r}")
    return int(m.group())


#: The healthy ceiling, by bits: twice what llama.cpp's own preset of that width measured with the verify tokens
#: on the continuous reference model (``builtin:smollm2-135m-continuous``; Q8_0 0.0052, Q6_K 0.0121, Q5_K_M
#: 0.0445, Q4_K_M 0.0662, Q3_K_M 0.208, Q2_K 0.443: benchmarks/quality.md). A 135M model is among the hardest to
#: quantise; larger ones measure lower. A check above it still passes (the artifact loads and is far from
#: broken) but is marked ``high`` in tables, logs and the card: there, 4-bit AWQ/GPTQ (0.17-0.28, +18-35% PPL)
#: are. Below 2 bits, where no preset was measured: half the bound.
KLD_EXPECTED: tuple[tuple[int, float], ...] = ((8, 0.01), (6, 0.025), (5, 0.09), (4, 0.13), (3, 0.42), (2, 0.9),
                                               (0, 2.0))


def _by_bits(table: tuple[tuple[int, float], ...], bits: int) -> float:
    return next(value for b, value in table if bits >= b)


def kld_bound(bits: int) -> float:
    """Highest mean KLD to the base that a quantisation of ``bits`` bits may reach and pass (see KLD_BOUNDS)."""
    return _by_bits(KLD_BOUNDS, bits)


def kld_expected(bits: int) -> float:
    """Highest mean KLD that healthy ``bits``-bit quantisations measured (see KLD_EXPECTED)."""
    return _by_bits(KLD_EXPECTED, bits)


def verify_artifact(base_path: str | Path, artifact: str | Path, *, bits: int, base_sha: str | None = None,
                    threads: int | None = None, engine: str = "auto") -> VerifyResult:
    """Load ``artifact`` (a .gguf file, or an AWQ/GPTQ/compressed-tensors folder) in its engine and score
    ``VERIFY_TOKENS`` tokens of the built-in evaluation text against the base at ``base_path`` (an HF folder).
    An HF-format folder is served by vLLM and compared with the base served by the same vLLM, where this
    machine's vLLM can run its scheme (``engine``: :func:`quantkit.engines.choose`); elsewhere it is loaded
    in transformers and the record says why it was not checked in vLLM (``extra.vllm``).

    Never raises for a broken artifact: a load or run failure comes back as ``passed=False`` with ``error``."""
    from quantkit import engines
    from quantkit.engines.hf import hf_format
    from quantkit.evaluate import Variant, _score_variant

    t0 = time.perf_counter()
    base_path, artifact = Path(base_path), Path(artifact)
    if base_sha is None:
        from quantkit.hub import resolve_model

        base_sha = resolve_model(str(base_path)).sha
    bound = kld_bound(bits)
    text, stream = _verify_stream(base_path)
    res = VerifyResult(passed=False, bits=bits, bound=bound, expected=kld_expected(bits), time=now_iso())
    if artifact.suffix == ".gguf":
        v = Variant(artifact.stem, "gguf", artifact, "gguf", str(artifact))
    else:
        v = Variant(artifact.name, "hf", artifact, hf_format(artifact), str(artifact))
    v.engine, v.engine_note = engines.choose(v.kind, artifact, engine)

    def reference(eng: str) -> dict:
        return _reference(base_path, base_sha, text, stream, threads, eng)

    try:
        cache = reference(engines.get(v.engine).reference)
    except QuantkitError as e:  # the base itself does not serve in vLLM: no vLLM check is possible here
        if v.engine != "vllm":
            raise
        v.engine, v.engine_note = "transformers", f"not checked in vLLM here: the base did not serve ({e})"
        cache = reference("transformers")
    if v.engine_note:
        res.extra["vllm"] = v.engine_note
    try:
        row = _score_variant(v, stream, cache, text, threads)
    except Exception as e:  # it does not load or run in its engine: that is the finding
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        res.error = msg if isinstance(e, QuantkitError) else f"{type(e).__name__}: {msg}"[:300]
        res.seconds = round(time.perf_counter() - t0, 2)
        return res
    res.engine, res.tokens = row["engine"], row["tokens"]
    res.extra["kld_estimator"] = row["kld_estimator"]
    res.kld, res.top1 = _finite(row["kld_mean"]), _finite(row["top1"])
    if row.get("nonfinite_logits"):
        res.error = f"{row['nonfinite_logits']} NaN/inf values in its logits"
    elif res.kld is None:
        res.error = "its KLD to the base is not a number (NaN/inf in its outputs)"
    elif isinstance(row.get("tokenizer_first_mismatch"), str):  # the artifact's own tokenizer fails
        res.error = row["tokenizer_first_mismatch"]
    res.passed = res.error is None and res.kld <= bound
    res.seconds = round(time.perf_counter() - t0, 2)
    return res


def _verify_stream(base_path: Path):
    """The verify text and its token stream under the base's tokenizer (kept for the process: every type of
    a GGUF run, and the check made ahead, use the same)."""
    folder = Path(base_path).resolve()
    stamp = tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in sorted(folder.glob("tokenizer*")))
    return _stream_for(str(folder), stamp)


@functools.lru_cache(maxsize=8)
def _stream_for(base_path: str, _tokenizer_files: tuple):
    from transformers import AutoTokenizer

    from quantkit.evaluate import load_text, make_stream

    text = load_text("builtin")[0][:VERIFY_CHARS]
    tok = AutoTokenizer.from_pretrained(base_path, **trust.hf_kwargs())
    return text, make_stream(tok, text, VERIFY_CTX, VERIFY_TOKENS)


def _reference(base_path: Path, base_sha: str, text: str, stream, threads: int | None, engine: str,
               show_progress: bool = True) -> dict:
    from quantkit.evaluate import DEFAULT_TOP_K, base_cache
    from quantkit.texts import text_sha256

    return base_cache(base_path, base_sha, text_sha256(text), stream, VERIFY_TOKENS, DEFAULT_TOP_K, threads,
                      engine=engine, show_progress=show_progress)[0]


def prepare(base_path: str | Path, base_sha: str, *, threads: int | None = None, gguf: str | Path | None = None,
            engine: str = "llama.cpp") -> None:
    """Make ahead what the first verify of a base spends its time on, e.g. in a thread while llama.cpp's
    converter runs: the imports, the base's reference over the verify tokens (cached on disk), and with ``gguf``
    llama.cpp's token ids of the verify text for that vocabulary (cached too). Never raises: whatever fails here
    is done again, and reported, by :func:`verify_artifact`."""
    from quantkit import engines

    try:
        text, stream = _verify_stream(Path(base_path))
        if gguf is not None:
            engines.get("llama.cpp").tokens(Path(gguf), text)
        else:
            _reference(Path(base_path), base_sha, text, stream, threads, engines.get(engine).reference,
                       show_progress=False)
    except Exception:  # noqa: BLE001 - see the docstring
        pass


def _finite(x) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def verify_recorded(manifest, name: str, base_path: str | Path, *, bits: int, enabled: bool = True,
                    base_sha: str | None = None, threads: int | None = None, engine: str = "auto") -> VerifyResult:
    """Verify artifact ``name`` of ``manifest`` (or record it as skipped when not ``enabled``), store the result
    as ``verify`` on the artifact and save. A re-run re-uses a passed record (or a skipped one when still not
    ``enabled``); the engines replace the whole record when they rebuild an artifact, so a stored result always
    belongs to the files on disk."""
    rec = manifest.artifact(name)
    path = manifest.folder / rec.get("path", ".")
    prev = VerifyResult.from_json(rec["verify"]) if isinstance(rec.get("verify"), dict) else None
    if prev is not None and prev.passed and prev.extra.get("vllm") and enabled and engine != "transformers":
        from quantkit import engines

        if engines.get("vllm").can_run(path)[0]:
            prev = None  # passed in transformers where vLLM could not run it; it can now: check it there
    if prev is not None and (prev.passed or (prev.skipped and not enabled)):
        return prev
    if enabled:
        res = verify_artifact(base_path, path, bits=bits, base_sha=base_sha, threads=threads, engine=engine)
    else:
        res = VerifyResult(passed=False, skipped=True, bits=bits, time=now_iso())
    manifest.update_artifact(name, verify=res.to_json())
    manifest.log("verify", artifact=name, passed=res.passed, skipped=res.skipped, kld=res.kld,
                 seconds=res.seconds)
    manifest.save()
    if res.high:
        print(f"warning: {name}: {res.high_line()}", file=sys.stderr)
    return res


def raise_if_failed(results: dict[str, VerifyResult], folder: str | Path) -> None:
    """One line naming every artifact whose check failed (exit 1); skipped ones are not failures here."""
    bad = {n: r for n, r in results.items() if not r.passed and not r.skipped}
    if bad:
        what = "; ".join(f"{n}: {r.problem()}" for n, r in bad.items())
        raise VerifyFailed(f"verify failed: {what} (files kept in {folder}, marked verify.passed: false in "
                           "quantkit.json; push refuses them)")


def unverified(manifest) -> dict[str, str]:
    """Artifacts of ``manifest`` without a passed check -> why. A LoRA adapter (``format: gguf-lora``) is not a
    quantised model and has no check of its own: what it does on a quantised base is measured by
    ``quantkit eval BASE+ADAPTER VARIANT+ADAPTER`` (its card's table)."""
    out = {}
    for name, rec in manifest.artifacts.items():
        if rec.get("format") == "gguf-lora":
            continue
        v = rec.get("verify")
        if not isinstance(v, dict):
            out[name] = "never verified (re-running the command that made it verifies it)"
        elif not v.get("passed"):
            out[name] = VerifyResult.from_json(v).problem()
    return out


def check_publishable(manifest, allow_unverified: bool = False) -> list[str]:
    """Refuse (QuantkitError) to publish a folder holding an artifact without a passed check, unless
    ``allow_unverified``; then return one warning per such artifact."""
    bad = unverified(manifest)
    if bad and not allow_unverified:
        what = "; ".join(f"{n}: {why}" for n, why in bad.items())
        raise QuantkitError(f"not publishing unverified artifacts ({what}); fix or rebuild them, or pass "
                            "--allow-unverified (the card then says they are unverified)")
    return [f"publishing {n} unverified: {why}" for n, why in bad.items()]
