"""Launch checks: the processes were started the way the user asked, and each knows its share of the CPU.

`core.make_accelerator` calls `check_launch_environment` before Accelerate starts (which would wait for ranks
that never come) and `check_launch` after; `launch_command` is the command line a run records.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from bloodgen_hf.errors import UsageError


class LaunchError(RuntimeError):
    """The processes were not started the way the user asked."""


def check_launch_environment() -> None:
    """`accelerate launch --cpu --num_processes N` starts ONE process with MASTER_ADDR set but no
    WORLD_SIZE; catch that instead of silently training on one process."""
    env = os.environ
    if "MASTER_ADDR" in env and "WORLD_SIZE" not in env and env.get("ACCELERATE_USE_CPU") is not None:
        raise LaunchError(
            "accelerate started 1 process although more were asked for: on CPU launch with "
            "`accelerate launch --multi_gpu --num_processes N` (not `--cpu --num_processes N`)"
        )


def check_launch(accelerator: Accelerator) -> None:
    """Every rank must see the same world: WORLD_SIZE processes, ranks 0..N-1."""
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    if expected != accelerator.num_processes:
        raise LaunchError(
            f"launched {expected} processes but each sees {accelerator.num_processes}: the ranks "
            "cannot see each other (on CPU use `accelerate launch --multi_gpu --num_processes N`)"
        )
    if accelerator.num_processes > 1:
        ranks = accelerator.gather(torch.tensor([accelerator.process_index], device=accelerator.device))
        if sorted(ranks.tolist()) != list(range(accelerator.num_processes)):
            raise LaunchError(f"process ranks {ranks.tolist()} are not 0..{accelerator.num_processes - 1}")


def cpu_threads(requested: int | None, num_processes: int) -> int:
    """`--cpu-threads`, else this machine's usable cores shared out among the processes."""
    if requested is not None:
        if requested < 1:
            raise UsageError(f"--cpu-threads must be at least 1, got {requested}")
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // num_processes)


def launch_command(num_processes: int) -> str:
    """The command line that started this run, as a user would type it (recorded for model cards)."""
    program, *args = sys.argv
    if program.endswith(".py"):
        processes = f"--multi_gpu --num_processes {num_processes} " if num_processes > 1 else ""
        return f"accelerate launch {processes}{shlex.join([program, *args])}"
    return shlex.join([Path(program).name, *args])
