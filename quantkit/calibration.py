"""Calibration text for AWQ / GPTQ (and llama.cpp's importance matrix): one SPEC, one :class:`Calibration`.

SPEC forms (``--calibration SPEC``)::

    None | "builtin"                      CPython's pydoc topics (quantkit.texts.builtin_calibration_text):
                                          offline, and a different document from the built-in eval text
    path/to/file.txt  (.md, .rst, .text)  plain text: paragraphs (blank-line separated) packed into samples of
                                          at most ``seq_len`` tokens (tokenizer given) or ~4*seq_len characters
    path/to/file.jsonl  (.ndjson)         one JSON object a line with a ``text`` (string) or ``messages``
                                          (chat list of {role, content}) field; messages are rendered with the
                                          tokenizer's chat template (plain "role: content" lines without one);
                                          one record = one sample, cut to ``seq_len`` tokens
    hub:org/name[:config]:split:column    a Hub dataset through ``datasets.load_dataset`` (streamed); rows of
                                          the column are packed like paragraphs (chat lists: one row a sample).
                                          ``org/name`` may also be a local folder of data files (offline use)

``samples`` chunks are kept, spread evenly over the document (txt/builtin) or the first ones (jsonl/hub), so
the same SPEC + tokenizer always gives the same texts; ``sha256`` is over ``"\\n\\n".join(texts)``.
:func:`parse_spec` checks a SPEC without reading anything (no network), :func:`load_calibration` loads it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from quantkit.errors import QuantkitError
from quantkit.texts import BUILTIN_CALIBRATION_NAME, builtin_calibration_text, text_sha256

TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst", ""}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
CHARS_PER_TOKEN = 4  # packing estimate when no tokenizer is given
HUB_PREFIX = "hub:"
_HUB_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_MAX_HUB_ROWS = 200_000  # never stream more rows than this looking for enough text


@dataclass(frozen=True)
class CalibrationSpec:
    """A parsed SPEC: ``kind`` is builtin | text | jsonl | hub."""

    kind: str
    spec: str
    path: Path | None = None
    dataset: str | None = None
    config: str | None = None
    split: str | None = None
    column: str | None = None

    @property
    def source(self) -> str:
        if self.kind == "builtin":
            return BUILTIN_CALIBRATION_NAME
        if self.kind == "hub":
            cfg = f":{self.config}" if self.config else ""
            return f"hub:{self.dataset}{cfg}:{self.split}:{self.column}"
        return f"file:{self.path}"


@dataclass
class Calibration:
    texts: list[str]
    source: str
    sha256: str
    token_count: int | None = None
    kind: str = "builtin"
    spec: str | None = None
    seq_len: int = 2048
    requested_samples: int = 128
    chat_template: str | None = None  # "model" | "plain" when chat messages were rendered
    extra: dict = field(default_factory=dict)

    @property
    def samples(self) -> int:
        return len(self.texts)

    def as_dict(self) -> dict:
        """What goes into quantkit.json's ``calibration`` (no texts, only their identity)."""
        d = {
            "source": self.source,
            "kind": self.kind,
            "spec": self.spec,
            "sha256": self.sha256,
            "samples": self.samples,
            "requested_samples": self.requested_samples,
            "seq_len": self.seq_len,
            "token_count": self.token_count,
            "characters": sum(len(t) for t in self.texts),
        }
        if self.chat_template:
            d["chat_template"] = self.chat_template
        d.update(self.extra)
        return d


# -- parsing ------------------------------------------------------------------------------------

def parse_spec(spec: str | None) -> CalibrationSpec:
    """Check a SPEC's form (no file reads beyond existence, no network); raise QuantkitError if malformed."""
    if spec is None or str(spec).strip().lower() in ("", "builtin", BUILTIN_CALIBRATION_NAME):
        return CalibrationSpec("builtin", "builtin")
    spec = str(spec).strip()
    if spec.startswith(HUB_PREFIX):
        return _parse_hub(spec)
    path = Path(os.path.expanduser(spec))
    if not path.exists():
        raise QuantkitError(f"calibration file {spec} does not exist (give a .txt or .jsonl file, "
                            "hub:org/name[:config]:split:column, or builtin)")
    if path.is_dir():
        raise QuantkitError(f"calibration {spec} is a folder; give a .txt or .jsonl file")
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return CalibrationSpec("jsonl", spec, path=path.resolve())
    if suffix in TEXT_SUFFIXES:
        return CalibrationSpec("text", spec, path=path.resolve())
    raise QuantkitError(f"calibration file {spec}: unsupported type {suffix!r} (use a plain-text .txt, or a "
                        ".jsonl with a 'text' or 'messages' field per line)")


def _parse_hub(spec: str) -> CalibrationSpec:
    body = spec[len(HUB_PREFIX):]
    parts = body.split(":")
    form = "hub:org/name[:config]:split:column"
    if len(parts) == 3:
        dataset, split, column = parts
        config = None
    elif len(parts) == 4:
        dataset, config, split, column = parts
    else:
        raise QuantkitError(f"calibration {spec!r} is not of the form {form} "
                            f"(e.g. hub:Salesforce/wikitext:wikitext-2-raw-v1:train:text)")
    if not _HUB_NAME_RE.match(dataset) and not os.path.isdir(os.path.expanduser(dataset)):
        raise QuantkitError(f"calibration {spec!r}: {dataset!r} is not a Hub dataset id ({form})")
    if not split or not column or (config is not None and not config):
        raise QuantkitError(f"calibration {spec!r} has an empty field; expected {form}")
    return CalibrationSpec("hub", spec, dataset=dataset, config=config, split=split, column=column)


# -- loading ------------------------------------------------------------------------------------

def load_calibration(spec: str | None = None, *, tokenizer=None, samples: int = 128,
                     seq_len: int = 2048) -> Calibration:
    """Load calibration samples for SPEC (see the module docstring). Raises QuantkitError on bad input."""
    if samples < 1:
        raise QuantkitError(f"--samples must be at least 1 (got {samples})")
    if seq_len < 16:
        raise QuantkitError(f"--seq-len must be at least 16 tokens (got {seq_len})")
    ps = parse_spec(spec)
    chat = None
    if ps.kind == "builtin":
        texts = _spread(_pack(_paragraphs(builtin_calibration_text()), tokenizer, seq_len), samples)
    elif ps.kind == "text":
        raw = _read_text(ps.path, ps.spec)
        texts = _spread(_pack(_paragraphs(raw), tokenizer, seq_len), samples)
    elif ps.kind == "jsonl":
        texts, chat = _load_jsonl(ps, tokenizer, samples, seq_len)
    else:
        texts, chat = _load_hub(ps, tokenizer, samples, seq_len)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise QuantkitError(f"calibration {ps.spec} yielded no text")
    token_count = None
    if tokenizer is not None:
        token_count = sum(len(ids) for ids in _encode(tokenizer, texts))
    return Calibration(texts=texts, source=ps.source, sha256=text_sha256("\n\n".join(texts)),
                       token_count=token_count, kind=ps.kind, spec=ps.spec, seq_len=seq_len,
                       requested_samples=samples, chat_template=chat)


def _read_text(path: Path, spec: str) -> str:
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise QuantkitError(f"calibration file {spec} is not UTF-8 text") from None
    if not raw.strip():
        raise QuantkitError(f"calibration file {spec} is empty")
    return raw


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    out = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [list(x) for x in out]


def _cut(text: str, tokenizer, max_tokens: int) -> list[str]:
    """Split one over-long text into pieces of at most ``max_tokens`` tokens (or ~chars without tokenizer)."""
    if tokenizer is None:
        n = max_tokens * CHARS_PER_TOKEN
        return [text[i:i + n] for i in range(0, len(text), n)]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True) \
        if getattr(tokenizer, "is_fast", False) else None
    if enc is not None and "offset_mapping" in enc:
        offs = enc["offset_mapping"]
        pieces = []
        for i in range(0, len(offs), max_tokens):
            chunk = offs[i:i + max_tokens]
            end = offs[i + max_tokens][0] if i + max_tokens < len(offs) else len(text)
            pieces.append(text[chunk[0][0]:end])
        return pieces
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [tokenizer.decode(ids[i:i + max_tokens]) for i in range(0, len(ids), max_tokens)]


def _pack(paragraphs: list[str], tokenizer, seq_len: int) -> list[str]:
    """Greedily join consecutive paragraphs into chunks of at most ``seq_len`` tokens (or ~characters)."""
    # Leave room for the special tokens (BOS) an engine adds when it tokenises a sample.
    budget = max(8, seq_len - 2)
    if tokenizer is None:
        lengths = [-(-len(p) // CHARS_PER_TOKEN) for p in paragraphs]
    else:
        lengths = [len(x) for x in _encode(tokenizer, paragraphs)]
    chunks: list[str] = []
    cur: list[str] = []
    cur_len = 0
    sep = 2 if tokenizer is not None else 1  # "\n\n" costs a token or so
    for p, n in zip(paragraphs, lengths):
        if n > budget:
            if cur:
                chunks.append("\n\n".join(cur))
                cur, cur_len = [], 0
            chunks.extend(_cut(p, tokenizer, budget))
            continue
        if cur and cur_len + sep + n > budget:
            chunks.append("\n\n".join(cur))
            cur, cur_len = [], 0
        cur.append(p)
        cur_len += n + (sep if len(cur) > 1 else 0)
    if cur:
        chunks.append("\n\n".join(cur))
    return chunks


def _spread(chunks: list[str], samples: int) -> list[str]:
    """``samples`` chunks spread evenly over the document (all of them when there are fewer)."""
    if len(chunks) <= samples:
        return chunks
    step = len(chunks) / samples
    return [chunks[int(i * step)] for i in range(samples)]


def _render_messages(messages, tokenizer, where: str) -> tuple[str, str]:
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise QuantkitError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False), "model"
        except Exception as e:  # a template that rejects these messages (e.g. role order)
            raise QuantkitError(f"{where}: the model's chat template rejected these messages "
                                f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages), "plain"


def _load_jsonl(ps: CalibrationSpec, tokenizer, samples: int, seq_len: int) -> tuple[list[str], str | None]:
    raw = _read_text(ps.path, ps.spec)
    texts: list[str] = []
    chat = None
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        where = f"calibration file {ps.spec} line {lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise QuantkitError(f"{where} is not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise QuantkitError(f"{where} is not a JSON object with a 'text' or 'messages' field")
        if "text" in rec:
            if not isinstance(rec["text"], str):
                raise QuantkitError(f"{where}: 'text' must be a string")
            text = rec["text"]
        elif "messages" in rec:
            text, chat = _render_messages(rec["messages"], tokenizer, where)
        else:
            fields = ", ".join(sorted(rec)) or "none"
            raise QuantkitError(f"{where} has no 'text' or 'messages' field (fields: {fields})")
        if text.strip():
            texts.append(_cut(text, tokenizer, seq_len)[0])
        if len(texts) >= samples:
            break
    if not texts:
        raise QuantkitError(f"calibration file {ps.spec} holds no non-empty records")
    return texts, chat


def _load_hub(ps: CalibrationSpec, tokenizer, samples: int, seq_len: int) -> tuple[list[str], str | None]:
    try:
        import datasets
    except ImportError:
        raise QuantkitError("hub: calibration needs the `datasets` package (pip install datasets)") from None
    streaming = "[" not in ps.split  # slices like train[:1000] need the non-streaming loader
    try:
        name = os.path.expanduser(ps.dataset) if os.path.isdir(os.path.expanduser(ps.dataset)) else ps.dataset
        ds = datasets.load_dataset(name, ps.config, split=ps.split, streaming=streaming)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise QuantkitError(f"calibration {ps.spec}: cannot load the dataset ({msg[:300]})") from None
    columns = getattr(ds, "column_names", None)
    if columns is None and hasattr(ds, "features") and ds.features is not None:
        columns = list(ds.features)
    if columns is not None and ps.column not in columns:
        raise QuantkitError(f"calibration {ps.spec}: the dataset has no column {ps.column!r} "
                            f"(columns: {', '.join(columns)})")
    texts: list[str] = []
    paragraphs: list[str] = []
    chat = None
    budget_chars = samples * seq_len * CHARS_PER_TOKEN
    have_chars = 0
    for i, row in enumerate(ds):
        if i >= _MAX_HUB_ROWS:
            break
        if ps.column not in row:
            raise QuantkitError(f"calibration {ps.spec}: the dataset has no column {ps.column!r} "
                                f"(columns: {', '.join(row)})")
        value = row[ps.column]
        if isinstance(value, list):
            text, chat = _render_messages(value, tokenizer, f"calibration {ps.spec} row {i}")
            texts.append(_cut(text, tokenizer, seq_len)[0])
            if len(texts) >= samples:
                break
            continue
        if not isinstance(value, str):
            raise QuantkitError(f"calibration {ps.spec}: column {ps.column!r} holds {type(value).__name__}, "
                                "not text or chat messages")
        if value.strip():
            paragraphs.append(value.strip())
            have_chars += len(value)
            if have_chars >= budget_chars:
                break
    if paragraphs:
        texts.extend(_pack(paragraphs, tokenizer, seq_len)[:max(0, samples - len(texts))])
    if not texts:
        raise QuantkitError(f"calibration {ps.spec}: column {ps.column!r} holds no text")
    return texts, chat
