"""The one table that turns Hub exceptions into one-line messages (quantkit.errors.HUB_ERRORS): a row each.

The huggingface_hub exceptions are made the way the client makes them: a real httpx response carrying the Hub's
headers, passed through huggingface_hub's own ``hf_raise_for_status``. No server, no network.
"""

from __future__ import annotations

import socket

import httpx
import pytest
from huggingface_hub import errors as hf_errors
from huggingface_hub.utils import hf_raise_for_status

from quantkit.errors import HUB_ERRORS, QuantkitError, hub_error, hub_error_row, is_network_error

URL = "https://hub.example/api/models/acme/tiny/revision/main"


def _raised(status: int, **headers) -> Exception:
    resp = httpx.Response(status, headers=headers, request=httpx.Request("GET", URL), text="")
    with pytest.raises(Exception) as info:
        hf_raise_for_status(resp)
    return info.value


def _wrapped(exc: Exception) -> Exception:
    """What huggingface_hub raises around a transport failure: its own error, the cause attached."""
    try:
        try:
            raise exc
        except Exception as inner:
            raise RuntimeError("request failed") from inner
    except RuntimeError as outer:
        return outer


CASES = {
    "invalid-token": lambda: _raised(401, **{"X-Error-Message": "Invalid credentials in Authorization header"}),
    "gated": lambda: _raised(403, **{"X-Error-Code": "GatedRepo", "X-Error-Message": "Access restricted"}),
    "no-revision": lambda: _raised(404, **{"X-Error-Code": "RevisionNotFound", "X-Error-Message": "no branch"}),
    "no-repo": lambda: _raised(404, **{"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}),
    "forbidden": lambda: _raised(403, **{"X-Error-Message": "You are not a member of acme"}),
    "network": lambda: httpx.ConnectError("[Errno 111] Connection refused"),
    "http": lambda: _raised(500, **{"X-Error-Message": "Internal Error - We're working hard to fix this"}),
    "other": lambda: ValueError("something unexpected"),
}


def test_every_row_has_a_case():
    assert sorted(CASES) == sorted(name for name, _, _ in HUB_ERRORS)


@pytest.mark.parametrize("row", list(CASES))
def test_row(row):
    e = CASES[row]()
    assert hub_error_row(e) == row
    msg = str(hub_error(e, "acme/tiny", "v2", what="read"))
    assert "\n" not in msg and "{" not in msg
    expected = {
        "invalid-token": ["invalid or expired", "HF_TOKEN", "hf auth login"],
        "gated": ["acme/tiny is gated", "accept its terms"],
        "no-revision": ["acme/tiny has no revision 'v2'"],
        "no-repo": ["acme/tiny was not found", "private", "cannot read it"],
        "forbidden": ["not authorised to read acme/tiny (HTTP 403)"],
        "network": ["cannot reach the Hub to read acme/tiny (ConnectError)", "HF_HUB_OFFLINE=1"],
        "http": ["HTTP 500", "acme/tiny", "working hard"],
        "other": ["could not read acme/tiny (ValueError: something unexpected)"],
    }[row]
    for needle in expected:
        assert needle in msg, msg


def test_the_classes_the_client_raises():
    assert isinstance(CASES["gated"](), hf_errors.GatedRepoError)
    assert isinstance(CASES["no-revision"](), hf_errors.RevisionNotFoundError)
    assert isinstance(CASES["no-repo"](), hf_errors.RepositoryNotFoundError)
    assert isinstance(CASES["http"](), hf_errors.HfHubHTTPError)


@pytest.mark.parametrize("make", [
    lambda: httpx.ConnectError("refused"),
    lambda: httpx.ReadTimeout("timed out"),
    lambda: httpx.ConnectTimeout("timed out"),
    lambda: httpx.RemoteProtocolError("peer closed connection"),
    lambda: ConnectionRefusedError(111, "Connection refused"),
    lambda: ConnectionResetError(104, "Connection reset by peer"),
    lambda: TimeoutError("timed out"),
    lambda: socket.gaierror(-2, "Name or service not known"),
    lambda: hf_errors.OfflineModeIsEnabled("offline"),
    lambda: hf_errors.LocalEntryNotFoundError("not cached and no connection"),
    lambda: _wrapped(httpx.ConnectError("refused")),
], ids=["ConnectError", "ReadTimeout", "ConnectTimeout", "RemoteProtocolError", "ConnectionRefused",
        "ConnectionReset", "TimeoutError", "gaierror", "OfflineMode", "LocalEntryNotFound", "wrapped"])
def test_network_errors(make):
    e = make()
    assert is_network_error(e) and hub_error_row(e) == "network"


@pytest.mark.parametrize("make", [
    lambda: _raised(500), lambda: _raised(404, **{"X-Error-Code": "RepoNotFound"}), lambda: _raised(401),
    lambda: OSError(28, "No space left on device"), lambda: PermissionError(13, "Permission denied"),
    lambda: ValueError("bad"),
], ids=["500", "404", "401", "disk-full", "permission", "ValueError"])
def test_not_network_errors(make):
    """The Hub answered (any HTTP status), or the failure is local: neither is 'cannot reach the Hub'."""
    assert not is_network_error(make())


def test_writing_says_nothing_changed_and_retry():
    for e in (CASES["network"](), CASES["http"](), CASES["other"]()):
        msg = str(hub_error(e, "acme/tiny", what="upload to", writing=True))
        assert "nothing was changed on the Hub" in msg and "re-run" in msg and "upload to acme/tiny" in msg
        assert "HF_HUB_OFFLINE" not in msg
    assert "nothing was changed" not in str(hub_error(CASES["network"](), "acme/tiny"))


def test_result_is_a_quantkit_error():
    assert isinstance(hub_error(CASES["no-repo"](), "acme/tiny"), QuantkitError)
