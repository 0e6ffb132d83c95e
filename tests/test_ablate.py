"""benchmarks/ablate.py: every config of every family is a command its train script accepts, with the options
it names, and bad config names are refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from bloodgen_hf.training import ddpm, gan, latent, vae
from bloodgen_hf.training.core import config_from_args, train_parser

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import ablate  # noqa: E402

OPTIONS = {"ddpm": ddpm.DDPMOptions, "gan": gan.GANOptions, "vae": vae.VAEOptions, "ldm": latent.LatentOptions}


def parse(family: str, argv: list[str]):
    """The TrainConfig (its `extra` the family's options) the family's train script makes of `argv`."""
    return config_from_args(train_parser("", OPTIONS[family]).parse_args(argv), OPTIONS[family])


def test_every_family_has_its_options_class():
    assert set(ablate.FAMILIES) == set(OPTIONS)


@pytest.mark.parametrize("family", sorted(ablate.FAMILIES))
def test_every_config_parses_and_changes_only_its_options(family):
    spec = ablate.FAMILIES[family]
    assert (ROOT / spec.script).is_file()
    shared = [*ablate.RUN_FOREVER, *spec.common, "--cpu-budget-minutes", "30"]
    base = parse(family, shared)
    assert base.cpu_budget_minutes == 30 and base.seed == 0
    for name, (_, options) in spec.configs.items():
        config = parse(family, [*shared, *options])
        changed = {k for k, v in vars(config.extra).items() if getattr(base.extra, k) != v}
        changed |= {k for k in ("balanced_batches", "mixed_precision") if getattr(config, k) != getattr(base, k)}
        assert bool(changed) == (name != "base"), (family, name, changed)


@pytest.mark.parametrize("family", ["gan", "vae"])
def test_the_v2_recipes_train_on_train_and_are_chosen_on_val(family):
    """Issue 33's v2 recipes come from these ablations, so they score against val, never test."""
    spec = ablate.FAMILIES[family]
    assert "--split" in spec.common and spec.common[spec.common.index("--split") + 1] == "train"
    assert spec.score == ("--split", "val")


def test_the_vae_configs_add_v2s_changes_one_at_a_time_and_pass_the_vaes_checks():
    spec = ablate.FAMILIES["vae"]
    shared = [*ablate.RUN_FOREVER, *spec.common, "--cpu-budget-minutes", "30"]
    configs = {name: parse("vae", [*shared, *options]) for name, (_, options) in spec.configs.items()}
    assert all(config.split == "train" for config in configs.values())
    assert configs.pop("bf16").mixed_precision == "bf16"  # base's recipe, in bf16 autocast
    steps = [(name, config.extra) for name, config in configs.items()]
    assert [name for name, _ in steps] == ["base", "resnet", "resnet-prior", "resnet-prior-adv"]
    assert [(o.backbone, o.prior_components, o.adv_weight) for _, o in steps] == [
        ("autoencoder_kl", 0, 0.0),
        ("resnet", 0, 0.0),
        ("resnet", 4, 0.0),
        ("resnet", 4, 300.0),
    ]
    adversarial = configs["resnet-prior-adv"].extra
    assert adversarial.adv_weight_mode == "fixed" and adversarial.adv_start == adversarial.kl_warmup_steps == 500
    for config in configs.values():  # what the script refuses before training: nothing here
        vae.check_options(config.extra, config.resolution)


def test_the_ldm_configs_train_on_the_stage_2_autoencoder_and_score_at_64_px_on_val():
    spec = ablate.FAMILIES["ldm"]
    config = parse("ldm", [*ablate.RUN_FOREVER, *spec.common])
    assert config.split == "train" and config.extra.guidance_scale == 2
    for _, options in spec.configs.values():  # the committed stage-2 autoencoders
        autoencoder = parse("ldm", [*ablate.RUN_FOREVER, *spec.common, *options]).extra.autoencoder
        assert (ROOT / autoencoder / "config.json").is_file(), autoencoder
    score = dict(zip(spec.score[::2], spec.score[1::2]))
    assert score["--split"] == "val" and (ROOT / score["--bloodnet"] / "classifier").is_dir()


def test_unknown_config_is_refused_in_one_line():
    done = subprocess.run(
        [sys.executable, "benchmarks/ablate.py", "--family", "gan", "--configs", "base,nope", "--out", "/nonexistent"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "error: unknown gan configs ['nope']; choose from: base, r1, balanced, ada, all, bf16"
    ]


def test_the_report_lists_every_finished_config_in_the_familys_order(tmp_path):
    """A later run that trains one config (or a run stopped half-way) still reports all the finished ones."""
    family = ablate.FAMILIES["gan"]
    for name, fd in (("all", 23.5), ("base", 21.0)):
        result = {
            "config": name, "parameters": 3.09e6, "train_images_per_s": 90.0, "steps": 1300, "fd_bloodnet": fd,
            "class_accuracy": 0.7, "per_class_accuracy": {"basophil": 0.1, "platelet": 0.9}, "recall": 0.3,
            "near_copies": 0.001, "machine": "test CPU",
        }  # fmt: skip
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "result.json").write_text(json.dumps(result))
    (tmp_path / "runs" / "r1").mkdir()  # unfinished: no result.json
    results = ablate.finished_results(family, tmp_path)
    assert [r["config"] for r in results] == ["base", "all"]
    args = SimpleNamespace(cpu_minutes=30.0, n=1712)
    ablate.report("gan", results, args, tmp_path)
    rows = [line for line in (tmp_path / "report.md").read_text().splitlines() if line.startswith("| base")]
    assert len(rows) == 1 and "| 21.00 | 0.700 | basophil 0.10 |" in rows[0]
    assert [r["config"] for r in json.loads((tmp_path / "results.json").read_text())] == ["base", "all"]
