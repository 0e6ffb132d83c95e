"""Protecting outputs: one writer at a time per output, and resumes that continue the same work.

`output_lock(path)` holds `.<name>.lock` beside `path` for as long as a command writes there: an
exclusive `fcntl.flock` on it, which the kernel releases when its holder ends however it ends (even by
`kill -9`), and the holder's PID, host and start time written in it. A second writer is refused, named
by those. A lock file that no live process holds is no obstacle: the next writer takes it over, and
first clears the temporaries that its killed holder left beside the output (`io.remove_temporaries`).

`changed_settings` / `check_unchanged` compare the settings recorded when a piece of work started
with those of the command that wants to continue it (training's `--resume`, `augment-study --resume`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from bloodgen_hf.io import remove_temporaries


class OutputLockedError(RuntimeError):
    """Another live process writes the output; the message names it."""


def lock_path(target: str | os.PathLike) -> Path:
    """`.<name>.lock` beside the target (beside, not inside: outputs are replaced by renaming)."""
    target = Path(os.path.abspath(target))
    return target.parent / f".{target.name}.lock"


@contextlib.contextmanager
def output_lock(target: str | os.PathLike) -> Iterator[Path]:
    """Hold the exclusive write lock of `target` for the duration of the block.

    Taking it clears what a killed earlier writer left beside `target` (its temporaries); leaving it
    removes the lock file. A holder killed before that leaves the file, but not the lock."""
    path = lock_path(target)
    fd, previous = _acquire(path, Path(target))
    try:
        removed = remove_temporaries(target)
        if previous or removed:
            _report_takeover(target, previous, removed)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # unlinked while still locked, so no one can take the old file after us
        os.close(fd)


def _acquire(path: Path, target: Path) -> tuple[int, dict | None]:
    """(fd holding the flock of the lock file still linked at `path`, now naming us; the holder it named
    before, a process that ended without removing it, or None)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise OutputLockedError(
                f"{target} is being written by another process ({describe_holder(holder)}; lock file {path})"
            ) from None
        if os.fstat(fd).st_nlink == 0:  # its holder removed it as we opened it: take a fresh one
            os.close(fd)
            continue
        try:
            previous = _read(fd)  # the kernel says no one holds it: whoever wrote this has ended
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder_info()).encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        return fd, previous


def _report_takeover(target: str | os.PathLike, previous: dict | None, removed: list[Path]) -> None:
    """One line on stderr: an earlier writer of `target` was stopped mid-way, and what of it was cleared."""
    who = f"a run ({describe_holder(previous, state=False)})" if previous else "a run"
    cleared = f"; removed its temporaries {', '.join(p.name for p in removed)}" if removed else ""
    print(f"note: {who} stopped while writing {target} (killed or crashed){cleared}", file=sys.stderr)


def _read(fd: int) -> dict | None:
    """The holder recorded in a lock file; None if it is empty (just created, or not yet written)."""
    text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return {"unreadable": text[:80]}


def holder_info() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def describe_holder(holder: dict | None, state: bool = True) -> str:
    """The holder in words: PID, host and start time, and if `state` and it is this host whether it runs."""
    if not holder:
        return "a process that is starting"
    if "pid" not in holder:
        return f"unknown holder {holder.get('unreadable', holder)!r}"
    here = state and holder.get("host") == socket.gethostname()
    alive = "" if not here else (", running" if pid_alive(int(holder["pid"])) else ", no longer running")
    return f"PID {holder['pid']} on host {holder.get('host')}, since {holder.get('since')}{alive}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- continuing work with the same settings ---------------------------------------------------------


def plain(value: Any) -> Any:
    """The value as JSON holds it (tuples become lists, paths strings), so records compare with commands."""
    return json.loads(json.dumps(value, default=str))


def changed_settings(before: dict, now: dict, may_change: Iterable[str] = ()) -> list[str]:
    """Sorted keys whose values differ between the two records (a key missing on one side differs)."""
    allowed = set(may_change)
    before, now = plain(before), plain(now)
    return sorted(k for k in before.keys() | now.keys() if k not in allowed and before.get(k) != now.get(k))


def check_unchanged(before: dict, now: dict, what: str, hint: str, may_change: Iterable[str] = ()) -> None:
    """Refuse (ValueError) to continue `what` with settings other than those it was started with."""
    keys = changed_settings(before, now, may_change)
    if not keys:
        return
    before, now = plain(before), plain(now)
    shown = "; ".join(f"{k} was {before.get(k)!r}, now {now.get(k)!r}" for k in keys[:6])
    more = f"; and {len(keys) - 6} more" if len(keys) > 6 else ""
    raise ValueError(f"{what} was started with other settings ({', '.join(keys)}): {shown}{more}; {hint}")
