"""benchmarks/ablate.py: every config of every family is a command its train script accepts, with the options
it names, and bad config names are refused in one line."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from bloodgen_hf.training import ddpm, gan
from bloodgen_hf.training.core import add_train_arguments, config_from_args
from bloodgen_hf.training.options import add_dataclass_arguments

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import ablate  # noqa: E402

OPTIONS = {"ddpm": ddpm.DDPMOptions, "gan": gan.GANOptions}


def parse(family: str, argv: list[str]):
    parser = add_dataclass_arguments(add_train_arguments(argparse.ArgumentParser()), OPTIONS[family])
    return config_from_args(parser.parse_args(argv), OPTIONS[family])


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
        changed |= {k for k in ("balanced_batches",) if getattr(config, k) != getattr(base, k)}
        assert bool(changed) == (name != "base"), (family, name, changed)


def test_unknown_config_is_refused_in_one_line():
    done = subprocess.run(
        [sys.executable, "benchmarks/ablate.py", "--family", "gan", "--configs", "base,nope", "--out", "/nonexistent"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "error: unknown gan configs ['nope']; choose from: base, r1, balanced, ada, all"
    ]
