"""User-facing errors.

A :class:`QuantkitError` is a mistake the user can fix (bad input, missing access, not enough disk):
the CLI prints its message on one line and exits non-zero, without a traceback. Anything else is a bug
and keeps its traceback.
"""


class QuantkitError(Exception):
    """One-line, actionable error. ``str(err)`` says what was wrong and what to do."""

    exit_code = 2


class GateFailed(QuantkitError):
    """A quality gate (``--max-kld`` and friends) failed: the work ran, the result is not acceptable."""

    exit_code = 1


# -- Hub errors -> one line ------------------------------------------------------------------------------------------
# Applied at the edge: every call into huggingface_hub (pull, push, plan's and eval's Hub lookups) turns what it
# raises into a QuantkitError through hub_error(), the one table below. Rows are tried in order; the first whose
# predicate holds gives the message. A template may use {repo}, {what} (the verb: "read", "upload to", ...),
# {revision}, {status}, {detail} (the server's X-Error-Message, else the exception's first line), {kind} (the
# exception's class name) and {retry} (what the edge says about retrying; see hub_error).

# Class names (of an exception, its bases, its cause and its context) that mean "no answer from the Hub". Names,
# so that httpx (huggingface_hub >= 1.0) and requests are both covered without importing either.
NETWORK_ERROR_NAMES = frozenset({
    "ConnectionError", "ConnectError", "ConnectTimeout", "ReadTimeout", "WriteTimeout", "PoolTimeout", "Timeout",
    "TimeoutException", "TimeoutError", "NetworkError", "RemoteProtocolError", "NameResolutionError", "gaierror",
    "OfflineModeIsEnabled", "LocalEntryNotFoundError",
})


def _chain(e: BaseException) -> list[BaseException]:
    return [x for x in (e, e.__cause__, e.__context__) if x is not None]


def http_status(e: BaseException) -> int | None:
    """The HTTP status of a Hub error (huggingface_hub keeps the response on the exception), else None."""
    return getattr(getattr(e, "response", None), "status_code", None)


def server_message(e: BaseException) -> str:
    """The Hub's own explanation (``X-Error-Message`` header) of the error or of its cause, else ''."""
    for x in _chain(e):
        headers = getattr(getattr(x, "response", None), "headers", None) or {}
        msg = headers.get("X-Error-Message") or ""
        if msg:
            return msg
    return ""


def is_network_error(e: BaseException) -> bool:
    """True when the Hub did not answer at all (refused, DNS, timeout, offline mode), not when it said no."""
    if http_status(e) is not None:
        return False
    return any({c.__name__ for c in type(x).__mro__} & NETWORK_ERROR_NAMES for x in _chain(e))


def _hf_error(name: str):
    """A predicate: is the exception huggingface_hub's ``errors.<name>`` (imported only when needed)?"""
    def pred(e: BaseException) -> bool:
        from huggingface_hub import errors as hf_errors

        return isinstance(e, getattr(hf_errors, name))
    pred.__name__ = name
    return pred


READ_RETRY = "; a model downloaded before can be used offline with HF_HUB_OFFLINE=1"
WRITE_RETRY = "; nothing was changed on the Hub (a commit is all-or-nothing): re-run the same command to retry"

HUB_ERRORS: list[tuple[str, object, str]] = [
    ("invalid-token",
     lambda e: http_status(e) == 401 and "invalid credentials" in server_message(e).lower(),
     "the Hub rejected your token as invalid or expired: set HF_TOKEN to a valid token or run `hf auth login` "
     "again"),
    ("gated", _hf_error("GatedRepoError"),
     "{repo} is gated: accept its terms on its Hub page with your account, then set HF_TOKEN or run "
     "`hf auth login` with a token of that account"),
    ("no-revision", _hf_error("RevisionNotFoundError"),
     "{repo} has no revision {revision!r} (give a branch, tag or commit SHA that exists)"),
    ("no-repo", _hf_error("RepositoryNotFoundError"),
     "{repo} was not found on the Hub, or it is private and your token cannot {what} it (check the id; set "
     "HF_TOKEN or run `hf auth login` with a token of an account that may {what} it)"),
    ("forbidden", lambda e: http_status(e) in (401, 403),
     "not authorised to {what} {repo} (HTTP {status}): set HF_TOKEN or run `hf auth login` with a token of an "
     "account that may {what} it"),
    ("network", is_network_error,
     "cannot reach the Hub to {what} {repo} ({kind}): check your network or HF_ENDPOINT{retry}"),
    ("http", lambda e: http_status(e) is not None,
     "the Hub answered HTTP {status} when asked to {what} {repo}: {detail}{retry}"),
    ("other", lambda e: True,
     "could not {what} {repo} ({kind}: {detail}){retry}"),
]


def hub_error_row(e: BaseException) -> str:
    """Name of the HUB_ERRORS row that translates ``e``."""
    return next(name for name, pred, _ in HUB_ERRORS if pred(e))


def hub_error(e: BaseException, repo_id: str, revision: str | None = None, *, what: str = "read",
              writing: bool = False) -> QuantkitError:
    """Translate an exception raised by huggingface_hub into one actionable line (see HUB_ERRORS).

    ``what`` is the verb of the failed step ("read", "upload to", ...); ``writing`` says the step was part of a push
    (a retry is safe), otherwise a network failure points at the offline cache.
    """
    template = next(t for _, pred, t in HUB_ERRORS if pred(e))
    if writing:
        retry = WRITE_RETRY
    else:
        retry = READ_RETRY if is_network_error(e) else ""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return QuantkitError(template.format(repo=repo_id, what=what, revision=revision or "main",
                                         status=http_status(e), detail=server_message(e) or first,
                                         kind=type(e).__name__, retry=retry))
