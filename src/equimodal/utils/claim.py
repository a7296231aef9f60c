"""One writer per folder: an exclusive claim taken before the first write and held for the whole job.

``equimodal train`` claims its run folder and ``equimodal prepare`` its ``--out`` folder; the experiment
drivers claim their output folder the same way::

    with claim_folder(out):          # raises RunFolderError while another process holds it
        ...                          # every write into ``out``

The claim is the file ``FOLDER/.equimodal-claim``, created with ``O_CREAT | O_EXCL`` (so exactly one of
two processes gets it) and holding JSON that names its owner: host, pid, the process's start time (from
``/proc/<pid>/stat`` on Linux, so a reused pid is told apart), its pid namespace, its command line, when
it started and a random token. It is removed when the job ends, on success, on an error and on SIGINT or
SIGTERM (which the trainer turns into an exception). While it is held, a daemon thread refreshes its
mtime every :data:`HEARTBEAT_SECONDS`.

A second writer is refused with a :class:`~equimodal.engine.run_folder.RunFolderError` naming the owner and the
ways out. A claim left by a job that died without removing it (SIGKILL, a crash, a lost machine) is
*stale* and taken over with a warning naming whose it was:

- on the same host (and pid namespace): its process is gone, or its pid now belongs to a process that
  started at another time. A live owner keeps its claim however long it is silent (a run suspended
  with Ctrl-Z continues when it is resumed);
- from another host, whose processes cannot be checked: it has not been refreshed for
  :data:`FOREIGN_STALE_SECONDS`.

Taking over is race-free: the taker first creates the hard link ``.equimodal-claim.takeover`` to the
claim file (``link`` fails when the name exists, so one taker at a time), checks that the link is still
the stale claim it judged, removes the claim, drops the link and creates its own claim exclusively. A
second process that judged the same stale claim either cannot link (and tries again) or links the new
claim, sees that it is not the stale one, and is refused by its owner.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shlex
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType

from .io import RunFolderError, check_writable_folder, write_error

log = logging.getLogger(__name__)

CLAIM_FILE = ".equimodal-claim"
"""The claim's file name inside the claimed folder."""
HEARTBEAT_SECONDS = 30.0
"""How often the owner refreshes its claim file's mtime."""
FOREIGN_STALE_SECONDS = 600.0
"""A claim of another host not refreshed for this long is stale (its owner cannot be checked from here)."""
UNREADABLE_STALE_SECONDS = 60.0
"""A claim file that cannot be read (its writer died between creating and filling it) is stale after this."""
TAKEOVER_STALE_SECONDS = 30.0
"""A takeover link left by a taker that died in the middle (microseconds of work) is removed after this."""
ATTEMPTS = 40
"""How often :func:`claim_folder` looks again while a claim is being written or taken over (50 ms apart)."""


@dataclass(frozen=True)
class Owner:
    """Who holds a claim: what ``.equimodal-claim`` holds."""

    host: str
    pid: int
    start_time: int | None  # clock ticks after boot (/proc/<pid>/stat field 22); None off Linux
    pid_ns: str | None  # the pid namespace (/proc/<pid>/ns/pid); None off Linux
    command: str
    since: str
    token: str

    @classmethod
    def current(cls) -> Owner:
        """This process, now."""
        pid = os.getpid()
        return cls(
            host=socket.gethostname(), pid=pid, start_time=process_start_time(pid), pid_ns=_pid_namespace(),
            command=_command_line(),
            since=datetime.now().astimezone().isoformat(timespec="seconds"), token=secrets.token_hex(8),
        )  # fmt: skip

    @classmethod
    def from_json(cls, text: str) -> Owner | None:
        """The owner a claim file names; ``None`` when it is empty or not a claim (being written, damaged)."""
        try:
            data = json.loads(text)
            owner = cls(**{k: data[k] for k in cls.__dataclass_fields__})
        except (ValueError, TypeError, KeyError):
            return None
        return owner if isinstance(owner.pid, int) and isinstance(owner.token, str) else None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def describe(self) -> str:
        """``pid 123 on host 'h', since 2024-05-01T10:00:00+02:00, running `equimodal train ...```."""
        return f"pid {self.pid} on host {self.host!r}, since {self.since}, running `{self.command}`"

    def who(self) -> str:
        """``pid 123 on host 'h'`` (the short form of :meth:`describe`)."""
        return f"pid {self.pid} on host {self.host!r}"

    def same_machine(self, other: Owner) -> bool:
        """Whether ``other``'s pid can be checked from this owner's process (same host and pid namespace)."""
        return self.host == other.host and self.pid_ns == other.pid_ns


def _command_line() -> str:
    """This process's command line, its program by name (``equimodal train ...`` for ``python -m equimodal``)."""
    if not sys.argv or not sys.argv[0]:
        return sys.executable
    program = Path(sys.argv[0])
    name = program.parent.name if program.name == "__main__.py" else program.name
    return shlex.join([name, *sys.argv[1:]])


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (field 3 first); None when unreadable."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def process_start_time(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks after boot (Linux); ``None`` where it cannot be read."""
    fields = _proc_stat(pid)
    return int(fields[19]) if fields is not None and len(fields) > 19 else None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def pid_alive(pid: int, start_time: int | None = None) -> bool:
    """Whether process ``pid`` runs on this host (a zombie does not), and started at ``start_time`` if given."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    fields = _proc_stat(pid)
    if fields is None:
        return not Path("/proc/self/stat").exists()  # no /proc here: trust os.kill
    if fields[0] in ("Z", "X"):
        return False
    return start_time is None or process_start_time(pid) == start_time


def stale_reason(owner: Owner | None, age: float, me: Owner) -> str | None:
    """Why a claim is stale, as a phrase; ``None`` when it is held.

    Args:
        owner: what the claim file names (``None``: unreadable).
        age: seconds since its mtime (its owner's last heartbeat).
        me: the process asking.
    """
    if owner is None:
        if age > UNREADABLE_STALE_SECONDS:
            return f"its claim file could not be read and is {age:.0f} s old"
        return None
    if owner.same_machine(me):
        if pid_alive(owner.pid, owner.start_time):
            return None
        if pid_alive(owner.pid):
            return "that process is gone (its pid now belongs to a process started at another time)"
        return "that process is gone"
    if age > FOREIGN_STALE_SECONDS:
        return (
            f"it was last refreshed {age / 60:.0f} min ago (stale after {FOREIGN_STALE_SECONDS / 60:.0f} min)"
        )
    return None


@dataclass(frozen=True)
class _Seen:
    """A claim file as read once: its owner (``None``: unreadable), age, and identity (inode, bytes)."""

    owner: Owner | None
    age: float
    identity: tuple[int, bytes]


def _look(path: Path) -> _Seen | None:
    """Read the claim file at ``path``; ``None`` when there is none."""
    try:
        with open(path, "rb") as f:
            data, st = f.read(), os.fstat(f.fileno())
    except FileNotFoundError:
        return None
    owner = Owner.from_json(data.decode("utf-8", "replace"))
    return _Seen(owner, time.time() - st.st_mtime, (st.st_ino, data))


def _create(path: Path, owner: Owner) -> bool:
    """Create the claim file exclusively; False when one exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return False
    except FileNotFoundError:  # the folder was removed by a job that had created it: make it again
        path.parent.mkdir(parents=True, exist_ok=True)
        return False
    try:
        with os.fdopen(fd, "w") as f:
            f.write(owner.to_json())
    except OSError as err:  # a full disk or a file size limit: name the file
        path.unlink(missing_ok=True)
        raise write_error(path, err) from err
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return True


class Claim:
    """A held claim on a folder (see :func:`claim_folder`); a context manager that releases it on exit."""

    def __init__(
        self, folder: Path, owner: Owner, heartbeat: float = HEARTBEAT_SECONDS, *, created: bool = False
    ) -> None:
        self.folder, self.owner, self.created = folder, owner, created
        self.path = folder / CLAIM_FILE
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._refresh, args=(heartbeat,), daemon=True, name="claim")
        self._beat.start()

    def held(self) -> bool:
        """Whether the claim file is still this claim's (not released, not taken over)."""
        seen = _look(self.path)
        return seen is not None and seen.owner is not None and seen.owner.token == self.owner.token

    def _refresh(self, every: float) -> None:
        while not self._stop.wait(every):
            if not self.held():
                log.warning(
                    "The claim on %s is no longer this process's (it was removed or taken over).", self.folder
                )
                return
            with contextlib.suppress(OSError):  # removed between the check and the touch: seen next beat
                os.utime(self.path)

    def release(self) -> None:
        """Stop the heartbeat and remove the claim file if it is still this claim's (idempotent).

        A folder that the claim created and that is left empty (the job was refused before writing) is
        removed too.
        """
        self._stop.set()
        if os.getpid() == self.owner.pid and self.held():  # never from a forked worker
            self.path.unlink(missing_ok=True)
            if self.created:
                with contextlib.suppress(OSError):  # not empty: the job wrote into it
                    self.folder.rmdir()

    def __enter__(self) -> Claim:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def claim_folder(folder: str | Path, *, flag: str = "--out", heartbeat: float = HEARTBEAT_SECONDS) -> Claim:
    """Claim ``folder`` (created if needed) for this process; use the result as a context manager.

    A stale claim (see the module docstring) is taken over with a warning naming whose it was.

    Args:
        folder: the folder every write of the job goes into.
        flag: the option that named it, for messages.
        heartbeat: seconds between two refreshes of the claim file's mtime.

    Raises:
        RunFolderError: another live process holds the claim (naming it and the fixes), or the folder is
            a file or cannot be written.
    """
    folder = Path(folder)
    created = not folder.exists()
    check_writable_folder(folder, flag)
    me, path = Owner.current(), folder / CLAIM_FILE
    seen = None
    for _ in range(ATTEMPTS):
        if _create(path, me):
            return Claim(folder, me, heartbeat, created=created)
        seen = _look(path)
        if seen is None:
            continue  # released in the meantime
        reason = stale_reason(seen.owner, seen.age, me)
        if reason is None and seen.owner is not None:
            raise _held_error(folder, seen.owner, flag)
        if reason is not None and _take_over(path, seen):
            who = seen.owner.describe() if seen.owner is not None else "an unknown process"
            log.warning("Taking over the stale claim on %s of %s: %s.", folder, who, reason)
            continue
        time.sleep(0.05)  # being written or being taken over by another process: look again
    raise RunFolderError(
        f"{flag} {str(folder)!r} could not be claimed: its claim file {str(path)!r} kept changing or could not "
        "be read. Another process is starting in this folder: wait for it, or pass another "
        f"{flag} folder. If no equimodal process uses it, delete {str(path)!r}."
    )


class ClaimHeld(RunFolderError):
    """The folder is claimed by another live process, named by :attr:`owner` (an experiment's executor
    reads this as "trained elsewhere": it waits for that run instead of failing it)."""

    def __init__(self, message: str, owner: Owner) -> None:
        super().__init__(message)
        self.owner = owner


def claim_holder(folder: str | Path) -> Owner | None:
    """Who holds ``folder``'s claim now: its owner while that claim is live, ``None`` when there is no
    claim or a stale one (which the next :func:`claim_folder` takes over). Reads, never writes."""
    seen = _look(Path(folder) / CLAIM_FILE)
    if seen is None or seen.owner is None:
        return None
    return seen.owner if stale_reason(seen.owner, seen.age, Owner.current()) is None else None


def _held_error(folder: Path, owner: Owner, flag: str) -> ClaimHeld:
    return ClaimHeld(
        f"{flag} {str(folder)!r} is in use by another process: {owner.describe()}. Nothing was changed. Wait "
        f"for it to finish, or pass another {flag} folder. (If that process is gone for good, e.g. on a "
        f"machine that was lost, delete {str(folder / CLAIM_FILE)!r}.)",
        owner,
    )


def _take_over(path: Path, seen: _Seen) -> bool:
    """Remove the stale claim ``seen`` at ``path`` if it is still there; True when this process removed it.

    Only the process that holds the takeover link may remove a stale claim, and only when that link is
    the claim it judged stale (not a newer one created in the meantime).
    """
    link = path.with_name(f"{path.name}.takeover")
    try:
        os.link(path, link)
    except FileNotFoundError:
        return False  # the stale claim is gone already
    except FileExistsError:
        _drop_abandoned(link)
        return False
    except OSError as err:  # a file system without hard links
        raise RunFolderError(
            f"The stale claim {str(path)!r} cannot be taken over here ({err.strerror or err}). No equimodal "
            f"process holds it: delete it and rerun."
        ) from err
    try:
        now = _look(link)
        if now is None or now.identity != seen.identity:
            return False  # not the claim judged stale: judge again
        path.unlink()
        return True
    except FileNotFoundError:
        return False  # its owner removed it after all
    finally:
        link.unlink(missing_ok=True)


def _drop_abandoned(link: Path) -> None:
    """Remove a takeover link whose taker died in the middle (older than :data:`TAKEOVER_STALE_SECONDS`)."""
    with contextlib.suppress(FileNotFoundError):
        if time.time() - link.stat().st_ctime > TAKEOVER_STALE_SECONDS:
            link.unlink(missing_ok=True)
