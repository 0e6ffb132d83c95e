"""Process-level speed settings that the CLI, the train scripts and the benchmarks apply at start-up.

glibc's malloc hands every allocation above its mmap threshold (128 KiB, adapting up to 32 MiB) to a
fresh mmap and gives freed memory back to the kernel above its trim threshold. A UNet forward pass on a
batch allocates and frees activations of tens of MB many times per step, so sampling spent about 11%
of its time in mmap/munmap and page faults (6.0M minor faults for one 250-image batch). Raising both
thresholds keeps that memory in the heap for reuse: `benchmarks/bench_speed.py` measures the gain.

`sigterm_exits` makes SIGTERM (what `timeout`, SLURM, systemd and `docker stop` send) stop a command the
way Ctrl-C does: unwinding, so its temporaries are removed and its output lock released, then exit 143.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import platform
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
HEAP_KEEP_BYTES = 1 << 30  # keep up to 1 GiB of freed memory in the heap before trimming
MMAP_ABOVE_BYTES = 1 << 30  # only allocations above 1 GiB get their own mmap
ENV_OVERRIDES = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")  # the user's own settings win
OPT_OUT = "BLOODGEN_TUNE_MALLOC"  # "0": leave glibc's defaults (benchmarks/bench_speed.py's baseline)
_applied: bool | None = None


def tune_malloc(trim_threshold: int = HEAP_KEEP_BYTES, mmap_threshold: int = MMAP_ABOVE_BYTES) -> bool:
    """Raise glibc malloc's trim and mmap thresholds for this process; True if both were set.

    Skipped (False) where the C library is not glibc, where the user set MALLOC_*_THRESHOLD_ in the
    environment, or with BLOODGEN_TUNE_MALLOC=0; either way only speed changes, never a result. Applied
    once per process."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get(OPT_OUT) == "0" or any(name in os.environ for name in ENV_OVERRIDES):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(M_TRIM_THRESHOLD, trim_threshold)) and bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold))
    return _applied


SIGTERM_EXIT_CODE = 128 + signal.SIGTERM  # 143: what shells report for a process that SIGTERM stopped


class Terminated(SystemExit):
    """SIGTERM arrived (`sigterm_exits`); exits the process with SIGTERM_EXIT_CODE once it has unwound."""


@contextlib.contextmanager
def sigterm_exits() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated` (a SystemExit with code 143) in the main thread, as
    Ctrl-C raises KeyboardInterrupt: `finally` blocks and context managers run (atomic_path removes its
    temporary, output_lock its lock file) before the process exits. A second SIGTERM, during that
    clean-up, stops the process at once (the default action); a killed writer's lock is released by the
    kernel anyway, and its temporaries are cleared by the next writer. A no-op outside the main thread.
    The earlier handler is back after a block that SIGTERM did not stop."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated(SIGTERM_EXIT_CODE)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is stop:  # else it fired: a second SIGTERM stays fatal
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


@functools.cache
def cpu_fields() -> dict[str, str]:
    """/proc/cpuinfo's fields for the first CPU ({} where there is none), read once: every sampling call asks
    `native_bf16`, and the CPU does not change under a running process."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for key, value in (line.split(":", 1) for line in lines if ":" in line):
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_name() -> str:
    """The CPU's model name and widest vector unit, for benchmark reports: CPU time buys different work on
    another CPU, and virtual machines often report only "AMD EPYC" for CPUs several times apart in speed."""
    fields = cpu_fields()
    name = fields.get("model name") or platform.processor() or "unknown CPU"
    if "flags" not in fields:  # no /proc/cpuinfo, or not x86: nothing more to say
        return name
    flags = fields["flags"].split()
    bf16 = ", bf16" if native_bf16(flags) else ""
    return f"{name} ({vector_unit(flags)}{bf16}, family {fields.get('cpu family', '?')})"


def vector_unit(flags: list[str]) -> str:
    """The widest x86 SIMD extension among /proc/cpuinfo's flags, which sets PyTorch's CPU kernels' speed."""
    for flag, label in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX")):
        if flag in flags:
            return label
    return "no AVX"


def native_bf16(flags: list[str] | None = None) -> bool:
    """Whether the CPU computes bfloat16 products in hardware (AMX-BF16 tiles or AVX512-BF16 dot products).

    There oneDNN runs a UNet pass in bf16 2.6x faster than in fp32 (`benchmarks/bench_speed.py`); without
    them bf16 is emulated and slower, so `--precision auto` keeps fp32."""
    flags = cpu_fields().get("flags", "").split() if flags is None else flags
    return "amx_bf16" in flags or "avx512_bf16" in flags
