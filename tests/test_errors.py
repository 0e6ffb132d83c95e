"""Issue 32: the project's refusals (UsageError and the domain errors) end a command with one `error:` line and
exit 2; anything else is a bug: one line that says so and points at --debug / BLOODGEN_DEBUG=1, exit 1."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from bloodgen_hf import sampling
from bloodgen_hf.cli import app
from bloodgen_hf.data import DataError
from bloodgen_hf.errors import BAD_INPUT_OS_ERRORS, UsageError, explain, is_refusal
from bloodgen_hf.training import core
from bloodgen_hf.training.core import ErrorExit
from bloodgen_hf.training.gan import main as train_gan

runner = CliRunner()
POINTER = "this is a bug — rerun with --debug or BLOODGEN_DEBUG=1 to see the traceback"
N_REFUSED = "error: --n must be a positive number of images, got 0"
TINY_GAN = ["--batch-size", "8", "--base-channels", "8", "--latent-dim", "16", "--log-with", "none"]


def invoke(*args, **kwargs):
    return runner.invoke(app, [str(a) for a in args], **kwargs)


def lines(result) -> list[str]:
    return result.output.strip().splitlines()


def raises(err: BaseException) -> BaseException:
    """`err` as it arrives in a handler: raised, so it has a traceback."""
    try:
        raise err
    except BaseException as caught:
        return caught


def boom(*args, **kwargs):
    raise ValueError("boom")


# --- the classification ------------------------------------------------------------------------------


def test_refusals_failures_and_bugs_get_their_exit_codes():
    assert issubclass(UsageError, ValueError)  # `except ValueError` and pytest.raises(ValueError) still catch it
    assert explain(raises(UsageError("--n must be positive"))) == (2, "--n must be positive")
    refusals = (DataError, *BAD_INPUT_OS_ERRORS)
    assert explain(raises(DataError("no archive")), refusals) == (2, "no archive")
    assert explain(raises(FileNotFoundError("no file X")), refusals) == (2, "no file X")
    disk_full = raises(OSError(28, "No space left on device"))
    assert explain(disk_full, refusals) == (1, "[Errno 28] No space left on device")
    assert explain(raises(MemoryError("out of memory"))) == (1, "out of memory")
    code, message = explain(raises(RuntimeError("shape mismatch\nmore detail")))
    assert code == 1 and message == f"internal error (RuntimeError: shape mismatch); {POINTER}"
    try:
        int("x")  # a ValueError that nobody meant as a refusal
    except ValueError as err:
        assert not is_refusal(err)
        message = "invalid literal for int() with base 10: 'x'"
        assert explain(err) == (1, f"internal error (ValueError: {message}); {POINTER}")


# --- the CLI -----------------------------------------------------------------------------------------


def test_a_refusal_is_one_line_and_exit_2(tmp_path):
    result = invoke("sample", "--n", 0, "--out", tmp_path / "s")
    assert result.exit_code == 2 and lines(result) == [N_REFUSED]
    assert not (tmp_path / "s").exists()


def test_an_internal_error_is_exit_1_and_points_at_debug(monkeypatch, tmp_path):
    monkeypatch.setattr(sampling, "check_count", boom)
    result = invoke("sample", "--n", 3, "--out", tmp_path / "s")
    assert result.exit_code == 1
    assert lines(result) == [f"error: internal error (ValueError: boom); {POINTER}"]
    assert "Traceback" not in result.output


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_prints_the_traceback_of_refusals_and_bugs(how, monkeypatch, tmp_path):
    flag, env = (["--debug"], {}) if how == "flag" else ([], {"BLOODGEN_DEBUG": "1"})
    refused = invoke(*flag, "sample", "--n", 0, "--out", tmp_path / "s", env=env)
    assert refused.exit_code == 2
    assert "Traceback (most recent call last)" in refused.output and "check_count" in refused.output
    assert lines(refused)[-1] == N_REFUSED  # the same line as without, last

    monkeypatch.setattr(sampling, "check_count", boom)
    bug = invoke(*flag, "sample", "--n", 3, "--out", tmp_path / "s", env=env)
    assert bug.exit_code == 1 and "Traceback (most recent call last)" in bug.output and "in boom" in bug.output
    assert lines(bug)[-1] == f"error: internal error (ValueError: boom); {POINTER}"

    quiet = invoke("sample", "--n", 3, "--out", tmp_path / "s")  # --debug was for that command only
    assert quiet.exit_code == 1 and "Traceback" not in quiet.output


def test_debug_env_off_values(tmp_path):
    for value in ("0", "", "false"):
        result = invoke("sample", "--n", 0, "--out", tmp_path / "s", env={"BLOODGEN_DEBUG": value})
        assert result.exit_code == 2 and lines(result) == [N_REFUSED], value


def test_ctrl_c_is_not_reported_as_a_bug(monkeypatch, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sampling, "check_count", interrupted)
    result = invoke("sample", "--n", 3, "--out", tmp_path / "s")
    assert result.exit_code not in (0, 2) and "internal error" not in result.output


def test_the_installed_command_prints_a_traceback_with_bloodgen_debug(tmp_path):
    """As a user runs it: `BLOODGEN_DEBUG=1 bloodgen-hf sample --n 0`."""
    env = {**os.environ, "BLOODGEN_DEBUG": "1"}
    command = [sys.executable, "-m", "bloodgen_hf.cli", "sample", "--n", "0"]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == N_REFUSED
    assert list(tmp_path.iterdir()) == []


# --- the train scripts ---------------------------------------------------------------------------------


def train(data_dir, out, *extra):
    return train_gan(["--data-dir", str(data_dir), "--output-dir", str(out), *TINY_GAN, *extra])


def test_a_train_script_reports_a_bug_as_one_line_and_exit_1(fake_data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(core, "make_accelerator", boom)
    with pytest.raises(ErrorExit) as err:
        train(fake_data_dir, tmp_path / "r")
    assert err.value.code == 1 and str(err.value) == f"error: internal error (ValueError: boom); {POINTER}"
    assert "Traceback" not in capsys.readouterr().err

    with pytest.raises(ErrorExit) as err:
        train(fake_data_dir, tmp_path / "r", "--debug")
    assert err.value.code == 1
    stderr = capsys.readouterr().err
    assert "Traceback (most recent call last)" in stderr and stderr.strip().splitlines()[-1] == str(err.value)


def test_a_train_script_refusal_keeps_exit_2_and_shows_its_traceback_when_debugging(
    fake_data_dir, tmp_path, monkeypatch, capsys
):
    refused = "--cpu-budget-minutes must be positive, got 0.0"
    args = ("--max-steps", "1", "--cpu-budget-minutes", "0")
    with pytest.raises(ErrorExit) as err:
        train(fake_data_dir, tmp_path / "r", *args)
    assert err.value.code == 2 and str(err.value) == f"error: {refused}"
    assert "Traceback" not in capsys.readouterr().err

    monkeypatch.setenv("BLOODGEN_DEBUG", "1")
    with pytest.raises(ErrorExit) as err:
        train(fake_data_dir, tmp_path / "r", *args)
    assert err.value.code == 2 and str(err.value) == f"error: {refused}"
    stderr = capsys.readouterr().err
    assert "Traceback (most recent call last)" in stderr and "check_cpu_budget" in stderr
