"""Built-in texts: a default evaluation text (shipped) and a default calibration text (from the stdlib).

They are different documents on purpose: a variant is never scored on the text it was calibrated on.
"""

from __future__ import annotations

from importlib import resources

from quantkit.util import sha256_bytes

BUILTIN_EVAL_NAME = "builtin:python-faq"
BUILTIN_CALIBRATION_NAME = "builtin:pydoc-topics"


def builtin_eval_text() -> str:
    """Python 3.11's General FAQ, Design FAQ and Functional HOWTO (PSF licence), ~100 KB, ~25k tokens."""
    return resources.files("quantkit").joinpath("data/eval-python-faq.txt").read_text(encoding="utf-8")


def builtin_calibration_text() -> str:
    """CPython's ``pydoc_data.topics`` (the language reference topics), ~700 KB, in every Python install."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def text_sha256(text: str) -> str:
    return sha256_bytes(text.encode("utf-8"))


#: A third text, for checking that a measured advantage is not an artefact of the evaluation text: prose of
#: another kind (the history of Python and its licences, the IDLE release history) that quantkit never calibrates,
#: heals or evaluates on by default. ~24 KB, ~5.5k tokens; in every CPython install.
UNSEEN_NAME = "cpython:LICENSE.txt+idlelib/HISTORY.txt"


def unseen_text() -> str:
    import sysconfig
    from pathlib import Path

    lib = Path(sysconfig.get_paths()["stdlib"])
    return "\n\n".join((lib / f).read_text(encoding="utf-8") for f in ("LICENSE.txt", "idlelib/HISTORY.txt"))


def held_out_texts() -> list[tuple[str, str, str]]:
    """The texts quality is measured on, as ``(label, text for evaluate(), name)``: the built-in evaluation text
    and the unseen prose."""
    return [("eval", "builtin", BUILTIN_EVAL_NAME), ("unseen", unseen_text(), UNSEEN_NAME)]
