"""Small shared helpers: atomic writes, hashing, progress bars, versions, tables."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from tqdm.auto import tqdm

PARTIAL_SUFFIX = ".partial"


def sha256_file(path: str | os.PathLike, chunk: int = 8 << 20, desc: str | None = None) -> str:
    """sha256 of a file, streamed (constant memory); shows a bar for big files."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f, progress(total=size, desc=desc or f"sha256 {path.name}", unit="B",
                                         unit_scale=True, disable=size < (256 << 20) or None) as bar:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
            bar.update(len(block))
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; rename it onto ``final`` only if the block succeeds.

    An interrupted run therefore never leaves a half-written file under a final name; the leftover
    ``.<name>.<random>.partial`` is removed on error (and ignored by everything else if the process dies).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=PARTIAL_SUFFIX, dir=final.parent)
    os.close(fd)
    tmp = Path(tmp)
    # mkstemp makes 0600 files; give the final file the permissions a plain open() would have.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


# -- files shared between processes ---------------------------------------------------------------------

def lock_file_for(path: str | os.PathLike) -> Path:
    """The lock file that guards ``path``: hidden, beside it (never pushed)."""
    path = Path(path)
    return path.parent / f".{path.name}.lock"


def folder_lock_file(folder: str | os.PathLike) -> Path:
    """A lock file for a folder that is replaced as a whole (built beside it, renamed into place): kept in
    quantkit's cache, keyed by the folder's absolute path, so the user's directory gets no extra file."""
    key = hashlib.sha256(str(Path(folder).absolute()).encode()).hexdigest()[:32]
    return cache_home() / "locks" / f"{key}.lock"


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, what: str | None = None) -> Iterator[bool]:
    """Hold an exclusive OS lock (``fcntl.flock``) on the file ``path`` (created if missing) for the block.

    Yields True when the lock was free, False when this process had to wait for another holder (then it says so
    on stderr, naming ``what``). The OS drops the lock when the holder dies, so a crash never leaves it held.
    flock locks belong to an open file: do not nest two locks on one path in one process.
    """
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        free = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            free = False
            if what:
                print(f"waiting for another process: {what}", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield free
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


_MISSING = object()


def merge_json_into(ours: dict, base: dict, theirs: dict) -> dict:
    """Three-way merge, in place: keep what this process changed in ``ours`` since it read ``base``, and take
    everything else from ``theirs`` (what is on disk now, written by other processes meanwhile).

    Dicts merge key by key (a key both sides added: ours wins); a list that this process only appended to
    gets its new items appended to theirs (events, history); anything else this process changed wins.
    Containers in ``ours`` keep their identity, so references held by callers stay valid.
    """
    for k in list(ours):
        if k in base and k not in theirs and ours[k] == base[k]:
            del ours[k]  # deleted by them, untouched by us
    for k, tv in theirs.items():
        bv = base.get(k, _MISSING)
        if k not in ours:
            if bv is _MISSING:
                ours[k] = tv  # added by them
            continue  # else deleted by us
        ov = ours[k]
        if bv is _MISSING:
            continue  # added by both: ours
        if isinstance(ov, dict) and isinstance(bv, dict) and isinstance(tv, dict):
            merge_json_into(ov, bv, tv)
        elif isinstance(ov, list) and isinstance(bv, list) and isinstance(tv, list) and ov[:len(bv)] == bv:
            ov[:] = tv + ov[len(bv):]
        elif ov == bv:
            ours[k] = tv
    return ours


def read_json(path: str | os.PathLike) -> dict | None:
    """The JSON object in ``path``, or None when the file is missing (JSON errors propagate)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    return json.loads(text)


def save_json_merged(path: str | os.PathLike, data: dict, base: dict | None, *, write: bool = True,
                     locked: bool = False, defaults: dict | None = None) -> dict:
    """Write ``data`` to ``path`` under the file's lock, merged with what other processes wrote since this
    process read ``base`` (see :func:`merge_json_into`); ``data`` is updated in place to the merged content.

    Returns the new base (a deep copy of what is now on disk). ``write=False`` only merges the disk's news
    into ``data`` (the caller's own changes stay pending). ``locked``: the caller already holds the lock.
    ``defaults``: top-level parts the caller's reader adds to an older file, added to the disk's copy too.
    """
    import copy

    path = Path(path)
    with (contextlib.nullcontext() if locked else file_lock(lock_file_for(path))):
        try:
            theirs = read_json(path)
        except json.JSONDecodeError:
            theirs = None  # a torn or hand-broken file: ours replaces it
        if theirs is not None:
            for k, v in (defaults or {}).items():
                theirs.setdefault(k, copy.deepcopy(v))
            merge_json_into(data, base if base is not None else {}, theirs)
        if not write:
            return copy.deepcopy(theirs if theirs is not None else (base or {}))
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, data)
        return copy.deepcopy(data)


def progress(iterable: Iterable | None = None, **kw) -> tqdm:
    """A progress bar on stderr. ``QUANTKIT_NO_PROGRESS=1`` turns every bar off."""
    if os.environ.get("QUANTKIT_NO_PROGRESS"):
        kw["disable"] = True
    kw.setdefault("file", sys.stderr)
    kw.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kw)


# -- cancelling: Ctrl-C, and the signals CI runners, Kubernetes, Slurm and a closing terminal send ---------------

def cancel_signals() -> tuple:
    """The signals that cancel a quantkit command: SIGINT (Ctrl-C), SIGTERM (CI runners, Kubernetes, Slurm,
    ``kill``), SIGHUP (the terminal closed)."""
    import signal

    return (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Cancelled(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where a Ctrl-C raises KeyboardInterrupt so that both unwind the same way (engines,
    children and servers stopped, nothing left under a final name); the process then exits ``128 + signum``."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def exit_code_of(interrupt: KeyboardInterrupt) -> int:
    """The shell's code for a process stopped by a signal: 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP."""
    import signal

    return 128 + getattr(interrupt, "signum", signal.SIGINT)


def cancel_word(interrupt: KeyboardInterrupt) -> str:
    """How a cancel is said in its one line: ``interrupted`` for Ctrl-C, ``cancelled by SIGTERM`` for the others."""
    import signal

    signum = getattr(interrupt, "signum", signal.SIGINT)
    return "interrupted" if signum == signal.SIGINT else f"cancelled by {signal.Signals(signum).name}"


def interrupt_for(signum: int) -> KeyboardInterrupt:
    """What a cancel signal raises: KeyboardInterrupt for Ctrl-C, :class:`Cancelled` for SIGTERM / SIGHUP."""
    import signal

    return KeyboardInterrupt() if signum == signal.SIGINT else Cancelled(signum)


#: How long a cancelled `quantkit` command may take to stop its engines, children and servers before it leaves
#: without the rest of its clean-up (stopping a vLLM server takes up to 30 s; deleting a big model's partial
#: folder can take a while on a slow disk).
CANCEL_GRACE_S = 120
_watchdog: list = []


def raise_cancelled(signum, frame):
    """The `quantkit` command's handler of the cancel signals: raise where the program is (KeyboardInterrupt for
    Ctrl-C, :class:`Cancelled` for SIGTERM / SIGHUP), and start a watchdog: a process that has not left
    :data:`CANCEL_GRACE_S` later (an engine's threads stuck while it unwinds) leaves then, saying so, with the same
    exit code."""
    import signal
    import threading

    if not _watchdog:
        def leave():
            name = signal.Signals(signum).name
            os.write(2, f"error: not stopped {CANCEL_GRACE_S} s after {name}: leaving without the rest of the "
                        "clean-up\n".encode())
            os._exit(128 + signum)

        t = threading.Timer(CANCEL_GRACE_S, leave)
        t.daemon = True
        t.start()
        _watchdog.append(t)
    raise interrupt_for(signum)


_CANCEL_HANDLED: set = set()  # the signals handle_cancel_signals took over (the `quantkit` command's process)


def handle_cancel_signals(again: bool = False) -> None:
    """Make SIGTERM and SIGHUP cancel like a Ctrl-C (:class:`Cancelled`), all three through
    :func:`raise_cancelled`. A signal the process was started with ignored (``nohup`` ignores SIGHUP, a background
    job SIGINT) stays ignored; only the main thread can do this. ``again``: take back the signals this function
    took before, from a library that installed handlers of its own since (``ray.init`` puts in a SIGTERM handler
    that prints a C++ stack dump); a process that never called it is left alone."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (_CANCEL_HANDLED.copy() if again else cancel_signals()):
        if again or signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, raise_cancelled)
            _CANCEL_HANDLED.add(sig)


@contextlib.contextmanager
def sigint_held() -> Iterator[None]:
    """Hold a cancel (Ctrl-C, SIGTERM, SIGHUP: :func:`cancel_signals`) that arrives inside the block until the block
    ends, then raise it: for starting a child process, which must not be interrupted half-way (a spawned child
    whose start-up data was cut off dies printing ``EOFError: Ran out of input``, and one not yet registered cannot
    be killed). The starting thread's signal mask blocks those signals meanwhile, so a child started here begins
    with them blocked (the mask survives exec): :func:`ignore_sigint`, its first step, keeps it out of the user's
    Ctrl-C, which the parent owns. Outside the main thread (where Python delivers no KeyboardInterrupt) the block
    just runs."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    sigs = [s for s in cancel_signals() if signal.getsignal(s) is not signal.SIG_IGN]  # ignored stays ignored
    prev = {s: signal.signal(s, lambda signum, frame: held.append(signum)) for s in sigs}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, set(sigs))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a pending signal lands now, in the holding handler
        for s, h in prev.items():
            signal.signal(s, h)
    if held:
        signum = held[0]
        handler = prev[signum]
        if callable(handler):
            handler(signum, None)  # the default SIGINT handler raises KeyboardInterrupt, ours Cancelled
        elif handler == signal.SIG_DFL:
            raise interrupt_for(signum)


def ignore_sigint() -> None:
    """In a child started under :func:`sigint_held`: ignore SIGINT from now on (a pending one is dropped), so a
    Ctrl-C at the terminal reaches only the parent, which stops the child itself; SIGTERM and SIGHUP keep their
    default action (the parent kills the child on any cancel)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, set(cancel_signals()))


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send whatever is printed meanwhile (Python, C libraries, child processes: fd 1) to stderr."""
    sys.stdout.flush()
    try:
        fd_saved = os.dup(1)
    except OSError:  # no real stdout
        fd_saved = None
    if fd_saved is not None:
        os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        try:
            sys.stdout.flush()
            _flush_c_stdio()
        finally:
            if fd_saved is not None:
                os.dup2(fd_saved, 1)
                os.close(fd_saved)


def _flush_c_stdio() -> None:
    """fflush(NULL): what a C library left in its stdout buffer belongs to the redirected fd, not the real one."""
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):  # no C library to flush (not POSIX)
        pass


def quiet_third_party_logs() -> None:
    """Silence import-time noise that says nothing to a quantkit user: torchao's "Failed to load <CUDA kernel
    .so>" on CPU-only machines (transformers imports torchao when it is installed) and torch's pytree
    deprecation warnings."""
    import logging

    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def versions(*names: str) -> dict[str, str | None]:
    """Installed versions of the given distributions, plus quantkit's own."""
    from quantkit import __version__

    out = {"quantkit": __version__}
    for n in names:
        out[n] = dist_version(n)
    return out


def read_safetensors_header(path: str | os.PathLike) -> dict:
    """The JSON header of a ``.safetensors`` file (tensor names -> dtype/shape/data_offsets); no weights read."""
    import struct

    from quantkit.errors import QuantkitError

    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise QuantkitError(f"{path} is not a safetensors file (too short)")
        n = struct.unpack("<Q", raw)[0]
        if n > 100 << 20:
            raise QuantkitError(f"{path} has a {n}-byte header: not a safetensors file")
        try:
            return json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise QuantkitError(f"{path} has an unreadable safetensors header") from None


def safetensors_tensors(folder: str | os.PathLike) -> Iterator[tuple[str, str, list[int], int]]:
    """``(name, dtype, shape, nbytes)`` for every tensor in a folder's ``*.safetensors`` files, headers only."""
    for p in sorted(Path(folder).glob("*.safetensors")):
        for name, t in read_safetensors_header(p).items():
            if name == "__metadata__":
                continue
            a, b = t["data_offsets"]
            yield name, t["dtype"], list(t.get("shape") or []), b - a


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def format_table(rows: Sequence[Sequence], headers: Sequence[str]) -> str:
    """Plain-text table, right-aligning numbers."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def fmt(r):
        out = []
        for i, c in enumerate(r):
            num = (c.replace(".", "", 1).replace("%", "").replace("-", "", 1).replace("+", "", 1).replace("x", "")
                   .strip().isdigit())
            out.append(c.rjust(widths[i]) if num else c.ljust(widths[i]))
        return "  ".join(out).rstrip()

    lines = [fmt(cells[0]), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in cells[1:]]
    return "\n".join(lines)


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        return False


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def cache_home() -> Path:
    """Where quantkit keeps things between runs (``QUANTKIT_CACHE`` overrides)."""
    root = os.environ.get("QUANTKIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "quantkit")
    p = Path(root)
    p.mkdir(parents=True, exist_ok=True)
    return p


def default_threads() -> int:
    """Threads for CPU work (quantising, eval, bench): ``QUANTKIT_THREADS`` when set, else the cores this
    process may run on (its CPU affinity, which containers and ``taskset`` narrow), not the machine's count."""
    env = os.environ.get("QUANTKIT_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1
