"""Fault injection (issues 16, 32): kill -9, SIGTERM, a full disk, concurrent writers and re-runs never lose or
mix a model, and what a stopped command leaves is no obstacle to the next one.

Training runs are real subprocesses of train_scripts/train_ddpm.py (tiny preset, 6 steps on the fake
archive: 5 batches an epoch, so a run crosses an epoch boundary), one thread each so runs compare bit
for bit. Kills land at random points, chosen from a seed printed on failure (BLOODGEN_FAULT_SEED
replays one). Sampling runs are subprocesses of `bloodgen-hf sample` with a tiny GAN, stopped once
their temporary output folder exists, so while they hold the lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bloodgen_hf.cli import app
from bloodgen_hf.guard import lock_path, output_lock
from bloodgen_hf.io import atomic_path, remove_temporaries
from bloodgen_hf.process import SIGTERM_EXIT_CODE, sigterm_exits
from bloodgen_hf.training import ddpm
from tests.conftest import write_fake_bloodmnist

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "train_scripts" / "train_ddpm.py"
STEPS = 6
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
# Files of a checkpoint that hold the training state itself (config.json records paths, progress.json CPU time).
STATE_FILES = ("unet.safetensors", "training_state.safetensors", "training_state.json", "rng_0.safetensors")

# Run as `python DRIVER train_ddpm.py ...`: dies by SIGKILL half way through writing a file, either the
# FAULT_AT-th file a checkpoint writes (FAULT_MODE=checkpoint) or the pipeline's weights (FAULT_MODE=pipeline).
DRIVER = """
import os, runpy, signal, sys
import safetensors.torch
import bloodgen_hf.io

def die_half_way(path, data):
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

if os.environ["FAULT_MODE"] == "checkpoint":
    real, calls = bloodgen_hf.io.write_durably, [0]
    def write_durably(path, data):
        calls[0] += 1
        if calls[0] == int(os.environ["FAULT_AT"]):
            die_half_way(path, data.encode() if isinstance(data, str) else data)
        real(path, data)
    bloodgen_hf.io.write_durably = write_durably  # before the training code imports it
else:
    safetensors.torch.save_file = lambda tensors, name, metadata=None: die_half_way(
        name, safetensors.torch.save(tensors, metadata)
    )
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def train_args(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data-dir", str(data_dir), "--output-dir", str(out), "--preset", "tiny", "--batch-size", "16",
        "--log-with", "none", "--grid-per-class", "1", "--sampler-steps", "2", "--log-every", "1",
        "--max-steps", str(STEPS), "--checkpoint-every", "2", "--keep-checkpoints", "2", *extra,
    ]  # fmt: skip


def start(args: list[str], driver: Path | None = None, **env) -> subprocess.Popen:
    command = [sys.executable, *([str(driver)] if driver else []), str(SCRIPT), *args]
    return subprocess.Popen(command, env={**ENV, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    _, stderr = process.communicate(timeout=timeout)
    return process.returncode, stderr


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_fake_bloodmnist(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory) -> Path:
    """One uninterrupted run, which the faulty runs must end up equal to (or leave untouched)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    code, stderr = finish(start(train_args(data_dir, out)))
    assert code == 0, stderr[-3000:]
    return out


# --- kill -9 ----------------------------------------------------------------------------------------


def holds_lock(process: subprocess.Popen, out: Path) -> bool:
    """Whether `process` holds the lock of `out` by now (and so handles SIGTERM: it does from before)."""
    with contextlib.suppress(FileNotFoundError, ValueError):
        return json.loads(lock_path(out).read_text()).get("pid") == process.pid
    return False


def kill_after_step(
    process: subprocess.Popen, out: Path, step: int, delay: float, sig=signal.SIGKILL
) -> tuple[int, str]:
    """Send `sig` `delay` seconds after metrics.jsonl shows `step`; the exit status and stderr (why a run that
    ended before the signal ended). SIGTERM also waits until `process` holds the lock (a resumed run's log
    shows earlier steps from its start)."""
    metrics = out / "metrics.jsonl"
    while process.poll() is None:
        if sig == signal.SIGTERM and not holds_lock(process, out):
            pass
        elif metrics.is_file() and metrics.read_text().count("\n") >= step:
            time.sleep(delay)
            process.send_signal(sig)
            break
        time.sleep(0.002)
    return finish(process)


def next_run_args(data_dir: Path, out: Path) -> list[str]:
    """What a user does after a crash: resume from the last checkpoint, or start again if there is none."""
    has_checkpoint = any((out / "checkpoints").glob("checkpoint-???????"))
    return train_args(data_dir, out, *(["--resume", "latest"] if has_checkpoint else ["--overwrite"]))


def test_kill_9_at_random_points_then_resume_equals_the_uninterrupted_run(data_dir, reference, tmp_path):
    seed = int(os.environ.get("BLOODGEN_FAULT_SEED", time.time_ns() % 1_000_000))
    rng = random.Random(seed)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out = tmp_path / "run"
    # a kill during steps (or whatever runs then), one inside a checkpoint's files, one inside the pipeline's,
    # and a SIGTERM during steps, which the run handles as Ctrl-C: it cleans up and exits 143
    kills = [("step", rng.randint(1, STEPS - 3), rng.uniform(0, 0.05)), ("checkpoint", rng.randint(1, 7), 0)]
    kills.append(("term", rng.randint(1, STEPS - 3), rng.uniform(0, 0.05)))
    rng.shuffle(kills)
    kills.append(("pipeline", 0, 0))
    args = train_args(data_dir, out)
    for number, (mode, at, delay) in enumerate(kills):
        where = f"seed {seed}, kill {number} ({mode} {at})"
        if mode == "term":
            code, stderr = kill_after_step(start(args), out, at, delay, signal.SIGTERM)
            assert code == SIGTERM_EXIT_CODE, f"{where}: {code} {stderr[-2000:]}"
            assert not lock_path(out).exists(), where
        elif mode == "step":
            code, stderr = kill_after_step(start(args), out, at, delay)
            assert code == -signal.SIGKILL, f"{where}: it ended first ({code}) {stderr[-2000:]}"
        else:
            code, stderr = finish(start(args, driver, FAULT_MODE=mode, FAULT_AT=str(at)))
            assert code == -signal.SIGKILL, f"{where}: {stderr[-2000:]}"
        # a killed run's lock file may stay; no process holds it, so the next run takes it over
        args = next_run_args(data_dir, out)
    code, stderr = finish(start(args))
    assert code == 0, f"seed {seed}: {stderr[-3000:]}"

    mine, ref = snapshot(out), snapshot(reference)
    last = f"checkpoints/checkpoint-{STEPS:07d}"
    for name in [f"{last}/{f}" for f in STATE_FILES] + ["pipeline/unet/diffusion_pytorch_model.safetensors"]:
        assert mine[name] == ref[name], f"seed {seed}: {name} differs from the uninterrupted run's"
    assert mine["samples/epoch_0001.png"] == ref["samples/epoch_0001.png"], f"seed {seed}"
    assert losses(out) == losses(reference), f"seed {seed}: metrics.jsonl differs"
    assert sorted(mine) == sorted(ref), f"seed {seed}: leftovers {sorted(set(mine) - set(ref))}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["driver.py", "run"]  # no lock, nothing beside it


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


# --- a full disk ------------------------------------------------------------------------------------


def limit_file_size(size: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


def test_a_full_disk_is_one_clean_error_and_keeps_the_checkpoints_and_pipeline(data_dir, reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = snapshot(out)
    # room for the 1.2 MB UNet weights but not the 3.7 MB optimizer state: the next checkpoint fails half way
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), *train_args(data_dir, out, "--max-steps", "8", "--resume", "latest")],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=limit_file_size(2_000_000),
    )
    code, stderr = finish(process)
    assert code == 1, stderr[-3000:]
    assert "Traceback" not in stderr
    [line] = error_lines(stderr)
    assert "could not write checkpoint" in line and "checkpoint-0000008" in line and "File too large" in line
    after = snapshot(out)
    assert sorted(after) == sorted(before)  # no half checkpoint, no temporary, no lock left behind
    for name, data in before.items():
        if name == "metrics.jsonl":  # the steps after the checkpoint were logged; a resume trims them again
            assert after[name].startswith(data)
        elif name != "train_config.json":  # records the latest command
            assert after[name] == data, name


# --- a finished run, and two writers ----------------------------------------------------------------


def test_training_again_into_a_finished_folder_is_refused_and_changes_nothing(data_dir, reference):
    before = snapshot(reference)
    with pytest.raises(SystemExit) as refused:
        ddpm.main(train_args(data_dir, reference))
    assert refused.value.code == 2
    assert str(refused.value) == (
        f"error: {reference} already holds a training run (last checkpoint at step {STEPS}, a final pipeline/); "
        "pass --resume latest to continue it, or --overwrite to delete it and start again"
    )
    assert snapshot(reference) == before
    assert not lock_path(reference).exists()


def test_two_concurrent_samples_into_one_folder_one_wins_the_other_changes_nothing(tiny_gan_dir, tmp_path):
    out = tmp_path / "race"
    command = [sys.executable, "-m", "bloodgen_hf.cli", "sample", "--n", "200", "--model", str(tiny_gan_dir)]
    runs = {
        seed: subprocess.Popen(
            [*command, "--out", str(out), "--seed", str(seed), "--device", "cpu"],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (1, 2)
    }
    results = {seed: finish(process) for seed, process in runs.items()}
    assert sorted(code for code, _ in results.values()) == [0, 2], results
    [winner] = [seed for seed, (code, _) in results.items() if code == 0]
    [(_, loser_stderr)] = [r for seed, r in results.items() if seed != winner]
    [line] = error_lines(loser_stderr)
    # the loser met the winner's lock (named by PID once the winner has written it) or its finished output
    assert "is being written by another process (" in line or "already exists; pass --overwrite" in line, line
    assert json.loads((out / "info.json").read_text())["seed"] == winner
    assert sorted(p.name for p in tmp_path.iterdir()) == ["race", "tiny_gan"]  # no temporary, no lock


def test_a_held_lock_refuses_a_second_writer_by_name_and_a_dead_holders_lock_is_taken_over(tiny_gan_dir, tmp_path):
    out = tmp_path / "samples"
    args = ["sample", "--n", "4", "--model", str(tiny_gan_dir), "--out", str(out), "--device", "cpu"]
    with output_lock(out) as lock:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2
        assert f"is being written by another process (PID {os.getpid()} on host" in result.output
        assert str(lock) in result.output and not out.exists()
    assert not lock.exists()

    # what a writer killed with -9 leaves: its lock file (the kernel released the lock) and temporaries
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(f'{{"pid": {dead.stdout.strip()}, "host": "{os.uname().nodename}", "since": "then"}}')
    (tmp_path / ".samples.k1ll3d_9.tmp").mkdir()
    (tmp_path / ".samples.k1ll3d_9.tmp" / "manifest.csv").write_text("half")
    (tmp_path / ".samples.npz.abcd1234.tmp").write_text("another output's")  # not ours: kept
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"note: a run (PID {dead.stdout.strip()} on host {os.uname().nodename}, since then) stopped" in result.output
    assert "removed its temporaries .samples.k1ll3d_9.tmp" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [".samples.npz.abcd1234.tmp", "samples", "tiny_gan"]


HOLDER = """
import sys, time
from bloodgen_hf.guard import output_lock
with output_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_the_kernel_releases_a_killed_holders_lock(tiny_gan_dir, tmp_path):
    out = tmp_path / "samples"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        args = ["sample", "--n", "4", "--model", str(tiny_gan_dir), "--out", str(out), "--device", "cpu"]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2
        assert f"is being written by another process (PID {holder.pid} on host" in result.output
        assert ", running; lock file" in result.output
    finally:
        holder.kill()
        holder.communicate()
    assert json.loads(lock_path(out).read_text())["pid"] == holder.pid  # the file stays, the lock does not
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"note: a run (PID {holder.pid} on host" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples", "tiny_gan"]


def start_sample(model: Path, out: Path) -> subprocess.Popen:
    """`bloodgen-hf sample` of a million images, one a batch: it runs until it is stopped."""
    command = [sys.executable, "-m", "bloodgen_hf.cli", "sample", "--n", "1000000", "--batch-size", "1"]
    return subprocess.Popen(
        [*command, "--model", str(model), "--out", str(out), "--device", "cpu"],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_temporary(process: subprocess.Popen, out: Path, timeout: float = 120) -> Path:
    """The hidden folder `process` writes `out` into, once it exists (the process holds the lock by then)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        found = list(out.parent.glob(f".{out.name}.*.tmp"))
        if found:
            return found[0]
        time.sleep(0.01)
    process.kill()
    raise AssertionError(f"no temporary of {out} appeared: {finish(process)[1][-2000:]}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "kill-9"])
def test_a_sample_stopped_by_a_signal_is_no_obstacle_to_the_next(tiny_gan_dir, tmp_path, sig):
    out = tmp_path / "X"
    process = start_sample(tiny_gan_dir, out)
    temporary = wait_for_temporary(process, out)
    assert lock_path(out).exists()
    process.send_signal(sig)
    code, stderr = finish(process)
    if sig == signal.SIGTERM:  # handled as Ctrl-C is: temporaries and lock removed, exit 143
        assert code == SIGTERM_EXIT_CODE, stderr[-2000:]
        assert "Traceback" not in stderr and not error_lines(stderr), stderr[-2000:]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny_gan"]
    else:  # the kernel released the lock; its file and the temporary stay until the next writer
        assert code == -signal.SIGKILL
        assert temporary.exists() and lock_path(out).exists()
    result = CliRunner().invoke(app, ["sample", "--n", "10", "--model", str(tiny_gan_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "info.json").read_text())["num_images"] == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["X", "tiny_gan"]  # no temporary, no lock


def test_sigterm_unwinds_the_block_and_exits_143_then_stays_fatal(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with sigterm_exits():
        pass
    assert signal.getsignal(signal.SIGTERM) is before  # restored after a block it did not stop
    with pytest.raises(SystemExit) as stopped:
        with sigterm_exits(), output_lock(tmp_path / "out"), atomic_path(tmp_path / "out", is_dir=True):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
    assert stopped.value.code == SIGTERM_EXIT_CODE == 143
    assert list(tmp_path.iterdir()) == []  # lock and temporary removed
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # a second SIGTERM would stop at once
    signal.signal(signal.SIGTERM, before)


def test_a_folder_moved_aside_for_a_swap_is_put_back_if_the_target_is_missing(tmp_path):
    target = tmp_path / "out"
    (tmp_path / ".out.old").mkdir()
    (tmp_path / ".out.old" / "a").write_text("old")
    (tmp_path / ".out.abcdefgh.tmp").mkdir()  # the new folder, never renamed into place
    assert [p.name for p in remove_temporaries(target)] == [".out.abcdefgh.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (target / "a").read_text() == "old"
    (tmp_path / ".out.old").mkdir()  # once the target is in place, a folder aside is a leftover
    assert [p.name for p in remove_temporaries(target)] == [".out.old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --- atomic commits ---------------------------------------------------------------------------------


def put(path: Path, text: str, is_dir: bool) -> None:
    """A file, or a folder holding one file named `text`."""
    if is_dir:
        path.mkdir(exist_ok=True)
        path = path / text
    path.write_text(text)


def read(path: Path, is_dir: bool) -> str:
    return ",".join(p.name for p in path.iterdir()) if is_dir else path.read_text()


@pytest.mark.parametrize("is_dir", [False, True])
def test_atomic_commit_never_replaces_a_target_that_appeared_meanwhile(tmp_path, is_dir):
    target = tmp_path / "out"
    with pytest.raises(FileExistsError, match="appeared while this command was writing it"):
        with atomic_path(target, is_dir=is_dir, overwrite=False) as tmp:
            put(tmp, "mine", is_dir)
            put(target, "theirs", is_dir)  # another process got there first
    assert read(target, is_dir) == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # our temporary is gone
    with atomic_path(target, is_dir=is_dir) as tmp:  # overwrite (the default) replaces it whole
        put(tmp, "mine", is_dir)
    assert read(target, is_dir) == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
