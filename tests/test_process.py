"""bloodgen_hf.process: the malloc tuning the CLI and the train scripts apply, and how to turn it off."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from bloodgen_hf.process import cpu_name, native_bf16, vector_unit

PROBE = "from bloodgen_hf.process import tune_malloc; print(tune_malloc(), tune_malloc())"


def probe(**env: str) -> str:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "BLOODGEN_TUNE"))}
    proc = subprocess.run([sys.executable, "-c", PROBE], env={**environment, **env}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_malloc_is_tuned_once_per_process_unless_the_user_says_otherwise():
    assert probe() == "True True"
    assert probe(BLOODGEN_TUNE_MALLOC="0") == "False False"
    assert probe(MALLOC_TRIM_THRESHOLD_="131072") == "False False"  # the user's own setting wins


def test_the_cli_tunes_malloc_before_any_command(monkeypatch):
    from typer.testing import CliRunner

    from bloodgen_hf import process
    from bloodgen_hf.cli import app

    calls = []
    monkeypatch.setattr(process, "tune_malloc", lambda: calls.append(1) or True)
    assert CliRunner().invoke(app, ["models"]).exit_code == 0
    assert calls == [1]


def test_training_uses_every_core_unless_told_otherwise(monkeypatch, fake_data_dir, tmp_path):
    """`accelerate launch` exports OMP_NUM_THREADS=1; a CPU run still gets the cores / processes."""
    import torch

    from bloodgen_hf.training import ddpm
    from bloodgen_hf.training.launch import cpu_threads
    from tests.test_ddpm import train_args

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert cpu_threads(None, 1) == 4 and cpu_threads(None, 2) == 2 and cpu_threads(None, 8) == 1
    assert cpu_threads(3, 1) == 3
    with pytest.raises(ValueError, match="--cpu-threads must be at least 1, got 0"):
        cpu_threads(0, 1)
    before = torch.get_num_threads()
    try:
        ddpm.main(train_args(fake_data_dir, tmp_path / "r", "--max-steps", "1", "--cpu-threads", "1"))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_vector_unit_names_the_widest_extension():
    """Two VMs that both call themselves "AMD EPYC" ran DDPM sampling 4x apart; reports must tell them apart."""
    assert vector_unit(["sse2", "avx", "avx2", "avx512f", "avx512bw"]) == "AVX-512"
    assert vector_unit(["sse2", "avx", "avx2"]) == "AVX2"
    assert vector_unit(["neon"]) == "no AVX"
    assert cpu_name()  # never raises, whatever the machine


def test_native_bf16_needs_amx_or_avx512_bf16():
    assert native_bf16(["avx512f", "amx_tile", "amx_bf16"]) and native_bf16(["avx512f", "avx512_bf16"])
    assert not native_bf16(["avx512f", "avx2"]) and not native_bf16([])
