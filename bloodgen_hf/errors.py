"""How the project refuses, and how a command ends on an error.

- A refusal (bad input or usage, a folder in the wrong state) raises `UsageError` or one of the domain
  errors (DataError, ModelLoadError, HubError, OutputLockedError, CheckpointError, LaunchError, LeakError).
  A command shows it as one `error: <message>` line and exits 2.
- An OSError while working (a full disk) or running out of memory: one `error:` line, exit 1.
- Anything else is a bug: one line that says so and how to see the traceback, exit 1.

`--debug` (before the command: `bloodgen-hf --debug sample ...`; a train script's own flag) or
BLOODGEN_DEBUG=1 prints the full traceback before that line, of refusals too.

A leaf module: the standard library only, so every module (the remote-code pipelines too, when
bloodgen_hf is installed) imports it without an import cycle.
"""

from __future__ import annotations

import os
import sys
import traceback

DEBUG_ENV = "BLOODGEN_DEBUG"
# Missing or misplaced files are the user's to fix (exit 2); another OSError is a failure while working (exit 1).
BAD_INPUT_OS_ERRORS = (FileExistsError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
# Modules whose refusals are still plain `raise ValueError(...)`: a ValueError raised by their own code counts as
# a refusal. Remove a module once it raises UsageError (then delete this and its use in is_refusal).
PENDING_MODULES = frozenset({"bloodgen_hf.guard"})


class UsageError(ValueError):
    """The project refuses what it was asked to do; the message says why and what to do instead.

    A ValueError, so code and tests that catch ValueError keep working."""


_debug = False


def set_debug(on: bool) -> None:
    """The --debug flag of this process (the CLI sets it for the command it runs)."""
    global _debug
    _debug = bool(on)


def debug_enabled() -> bool:
    """--debug, or BLOODGEN_DEBUG set to anything but empty, 0, false, no or off."""
    return _debug or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def raised_in(err: BaseException) -> str | None:
    """The name of the module whose code raised `err` (the innermost frame of its traceback)."""
    tb = err.__traceback__
    if tb is None:
        return None
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_globals.get("__name__")


def is_refusal(err: BaseException, refusals: tuple[type[BaseException], ...] = ()) -> bool:
    """Whether `err` is the project refusing bad input: a UsageError, one of `refusals` (the caller's domain
    errors) or a ValueError of a module in PENDING_MODULES."""
    if isinstance(err, (UsageError, *refusals)):
        return True
    return isinstance(err, ValueError) and raised_in(err) in PENDING_MODULES


def is_failure_while_working(err: BaseException, failures: tuple[type[BaseException], ...] = (OSError,)) -> bool:
    """An error of the machine, not of the code: `failures` (an OSError such as a full disk) or out of memory."""
    return isinstance(err, (*failures, MemoryError)) or type(err).__name__ == "OutOfMemoryError"  # torch's


def internal_error_message(err: BaseException) -> str:
    text = str(err).strip()
    what = f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__
    return f"internal error ({what}); this is a bug — rerun with --debug or {DEBUG_ENV}=1 to see the traceback"


def explain(
    err: BaseException,
    refusals: tuple[type[BaseException], ...] = (),
    failures: tuple[type[BaseException], ...] = (OSError,),
    debug: bool = False,
) -> tuple[int, str]:
    """(exit code, the message of the one `error:` line) for an exception that ended a command, after printing
    its traceback on stderr when debugging (`debug` or debug_enabled()): 2 for a refusal (its message as it
    is), 1 for a failure while working (likewise) and 1 for anything else, a bug (internal_error_message)."""
    if debug or debug_enabled():
        traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
        sys.stderr.flush()
    if is_refusal(err, refusals):
        return 2, str(err)
    if is_failure_while_working(err, failures):
        return 1, str(err)
    return 1, internal_error_message(err)
