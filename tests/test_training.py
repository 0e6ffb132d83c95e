import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from bloodgen_hf.registry import load_pipeline
from bloodgen_hf.training import checkpoint
from bloodgen_hf.training.core import epoch_batches
from bloodgen_hf.training.gan import main as train_gan

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--batch-size", "8", "--base-channels", "8", "--latent-dim", "16", "--log-with", "none", "--log-every", "1"]


def run(data_dir, out, *extra):
    train_gan(["--data-dir", str(data_dir), "--output-dir", str(out), *TINY, *extra])
    AcceleratorState._reset_state(True)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for name in ("generator", "discriminator"):
        tensors.update({f"{name}.{k}": v for k, v in load_file(str(folder / f"{name}.safetensors")).items()})
    tensors.update({f"state.{k}": v for k, v in load_file(str(folder / "training_state.safetensors")).items()})
    return tensors


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_epoch_batches_are_fixed_by_seed_and_epoch_and_split_ranks():
    a = epoch_batches(50, 4, seed=1, epoch=2, rank=0, world=2)
    assert a.shape == (6, 4)
    assert torch.equal(a, epoch_batches(50, 4, seed=1, epoch=2, rank=0, world=2))
    b = epoch_batches(50, 4, seed=1, epoch=2, rank=1, world=2)
    assert not set(a.flatten().tolist()) & set(b.flatten().tolist())  # ranks see disjoint images
    assert not torch.equal(a, epoch_batches(50, 4, seed=1, epoch=3, rank=0, world=2))
    with pytest.raises(ValueError, match="cannot fill one batch"):
        epoch_batches(5, 4, seed=0, epoch=0, rank=0, world=2)


def test_checkpoint_state_round_trips_without_pickle(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), betas=(0.0, 0.9))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"opt": opt.state_dict(), "rng": checkpoint.rng_state(), "t": (1, "a", None, 2.5)}
    checkpoint.save_state(state, tmp_path / "s")
    back = checkpoint.load_state(tmp_path / "s")
    assert back["t"] == (1, "a", None, 2.5)
    assert back["opt"]["param_groups"][0]["betas"] == (0.0, 0.9)
    assert torch.equal(back["opt"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    opt.load_state_dict(back["opt"])
    checkpoint.set_rng_state(back["rng"])
    x = torch.rand(3)
    checkpoint.set_rng_state(back["rng"])
    assert torch.equal(torch.rand(3), x)
    (tmp_path / "s.safetensors").write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="corrupt or incomplete checkpoint file"):
        checkpoint.load_state(tmp_path / "s")


@pytest.mark.parametrize("accumulation", ["1", "2"])
def test_interrupted_and_resumed_training_matches_uninterrupted(fake_data_dir, tmp_path, accumulation):
    # 80 images / batch 8 = 10 batches per epoch: the run crosses epoch boundaries and the resume
    # point falls mid-epoch.
    steps, half = ("14", "7") if accumulation == "1" else ("8", "3")
    common = ["--gradient-accumulation-steps", accumulation, "--checkpoint-every", half, "--keep-checkpoints", "5"]
    run(fake_data_dir, tmp_path / "full", "--max-steps", steps, *common)
    run(fake_data_dir, tmp_path / "split", "--max-steps", half, *common)
    run(fake_data_dir, tmp_path / "split", "--max-steps", steps, "--resume", "latest", *common)
    name = f"checkpoint-{int(steps):07d}"
    assert_same(weights(tmp_path / "full" / "checkpoints" / name), weights(tmp_path / "split" / "checkpoints" / name))
    progress = json.loads((tmp_path / "full" / "checkpoints" / name / "progress.json").read_text())
    assert progress["step"] == int(steps)


def test_training_writes_grids_metrics_and_a_loadable_pipeline(fake_data_dir, tmp_path):
    run(fake_data_dir, tmp_path / "run", "--epochs", "2", "--loss", "wgan-gp")
    out = tmp_path / "run"
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["epoch_0001.png", "epoch_0002.png"]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 21))
    assert all({"loss_d", "loss_g"} <= r.keys() for r in lines)
    assert not list((out / "checkpoints").glob("*.tmp"))
    pipe = load_pipeline(str(out / "pipeline"))
    assert pipe(2, output_type="pt").images.shape == (2, 3, 28, 28)


def test_minibatch_std_training_and_its_batch_check(fake_data_dir, tmp_path):
    run(fake_data_dir, tmp_path / "run", "--epochs", "1", "--loss", "wgan-gp", "--minibatch-std-group", "4")
    d = load_file(str(tmp_path / "run" / "checkpoints" / "checkpoint-0000010" / "discriminator.safetensors"))
    assert d["features.7.weight_orig"].shape[1] == 8 * 4 + 1  # the last features plus the spread channel
    with pytest.raises(SystemExit, match="--minibatch-std-group 3 must divide --batch-size 8"):
        run(fake_data_dir, tmp_path / "bad", "--minibatch-std-group", "3")


def test_resume_errors_are_clear(fake_data_dir, tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint in") as err:
        run(fake_data_dir, tmp_path / "empty", "--max-steps", "2", "--resume", "latest")
    assert err.value.code == 2
    with pytest.raises(SystemExit, match="missing .*bloodmnist.npz") as err:
        run(tmp_path / "nodata", tmp_path / "x", "--max-steps", "2")
    assert err.value.code == 2  # bad input exits 2, as in every command


def test_a_junk_archive_is_bad_input_with_a_plain_message(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "bloodmnist.npz").write_text("<html>not found</html>")
    with pytest.raises(SystemExit) as err:
        run(tmp_path / "data", tmp_path / "x", "--max-steps", "2")
    assert err.value.code == 2
    message = capsys.readouterr().err.strip()
    junk = tmp_path / "data" / "bloodmnist.npz"
    assert message.startswith(f"error: {junk} is not a ") and "(not an .npz file)" in message
    assert "\n" not in message and "pickle" not in message  # not numpy's allow_pickle advice
    assert not (tmp_path / "x").exists()


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_folder_holding_a_run_needs_resume_or_overwrite(fake_data_dir, tmp_path):
    out = tmp_path / "run"
    run(fake_data_dir, out, "--max-steps", "4", "--checkpoint-every", "2", "--epochs", "1")
    before = files(out)
    with pytest.raises(SystemExit) as err:
        run(fake_data_dir, out, "--max-steps", "2")
    assert err.value.code == 2
    assert str(err.value) == (
        f"error: {out} already holds a training run (last checkpoint at step 4, a final pipeline/); "
        "pass --resume latest to continue it, or --overwrite to delete it and start again"
    )
    with pytest.raises(SystemExit, match="pass one of them") as err:
        run(fake_data_dir, out, "--max-steps", "2", "--resume", "latest", "--overwrite")
    assert err.value.code == 2 and files(out) == before

    run(fake_data_dir, out, "--max-steps", "1", "--overwrite")  # the old run is gone, none of it resumable
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-0000001"]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert not (out / "samples").exists() and (out / "pipeline" / "model_index.json").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "metrics.jsonl", "pipeline", "train_config.json"]


def test_resume_refuses_other_settings_by_name_and_allows_a_longer_run(fake_data_dir, tmp_path):
    out = tmp_path / "run"
    run(fake_data_dir, out, "--max-steps", "2", "--checkpoint-every", "2")
    before = files(out)
    with pytest.raises(SystemExit) as err:
        run(fake_data_dir, out, "--max-steps", "4", "--resume", "latest", "--loss", "wgan-gp", "--seed", "3")
    assert err.value.code == 2
    message = str(err.value)
    assert message.startswith(f"error: --resume: {out / 'checkpoints' / 'checkpoint-0000002'} was started with ")
    assert "other settings (loss, seed): loss was 'hinge', now 'wgan-gp'; seed was 0, now 3;" in message
    assert files(out) == before
    recorded = json.loads((out / "checkpoints" / "checkpoint-0000002" / "config.json").read_text())
    assert recorded["batch_size"] == 8 and recorded["base_channels"] == 8 and recorded["num_processes"] == 1
    # the run's length, where the data is, logging and checkpointing may change
    run(fake_data_dir, out, "--max-steps", "4", "--resume", "latest", "--checkpoint-every", "1", "--log-every", "2")
    assert (out / "checkpoints" / "checkpoint-0000004").is_dir()


def launch(tmp_path, data_dir, *launch_args, steps="4"):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *launch_args,
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(ROOT / "train_scripts" / "train_gan.py"),
        "--data-dir",
        str(data_dir),
        "--output-dir",
        str(tmp_path / "mp"),
        "--max-steps",
        steps,
        *TINY,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_two_process_cpu_training(fake_data_dir, tmp_path):
    result = launch(tmp_path, fake_data_dir, "--multi_gpu", "--num_processes", "2", "--main_process_port", "29517")
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = tmp_path / "mp" / "checkpoints" / "checkpoint-0000004"
    assert (ckpt / "rng_0.json").is_file() and (ckpt / "rng_1.json").is_file()
    assert (tmp_path / "mp" / "pipeline" / "model_index.json").is_file()


def test_cpu_flag_with_two_processes_is_a_clear_error(fake_data_dir, tmp_path):
    result = launch(tmp_path, fake_data_dir, "--cpu", "--num_processes", "2")
    assert result.returncode != 0
    assert "on CPU launch with `accelerate launch --multi_gpu --num_processes N`" in result.stderr
