"""Training: one shared loop (`core`) and a TrainTask per model family."""

from __future__ import annotations


def train_command(family: str) -> str:
    """How `bloodgen-hf train` names a family's script in its usage and error lines (core.train_parser's `prog`)."""
    return f"bloodgen-hf train {family}"


def _gan_main(argv: list[str]):
    from bloodgen_hf.training.gan import main

    return main(argv, prog=train_command("gan"))


def _ddpm_main(argv: list[str]):
    from bloodgen_hf.training.ddpm import main

    return main(argv, prog=train_command("ddpm"))


def _vae_main(argv: list[str]):
    from bloodgen_hf.training.vae import main

    return main(argv, prog=train_command("vae"))


def _ldm_main(argv: list[str]):
    from bloodgen_hf.training.latent import main

    return main(argv, prog=train_command("ldm"))


def _student_main(argv: list[str]):
    from bloodgen_hf.training.student import main

    return main(argv, prog=train_command("student"))


def _autoencoder_main(argv: list[str]):
    from bloodgen_hf.training.autoencoder import main

    return main(argv, prog=train_command("autoencoder"))


def _bloodnet_main(argv: list[str]):
    from bloodgen_hf.evaluation.bloodnet_train import main

    return main(argv, prog=train_command("bloodnet"))


# family name -> main(argv), its usage and error lines naming `bloodgen-hf train <family>`; used by that command
TRAIN_ENTRY_POINTS = {
    "gan": _gan_main,
    "ddpm": _ddpm_main,
    "vae": _vae_main,
    "ldm": _ldm_main,
    "student": _student_main,
    "autoencoder": _autoencoder_main,
    "bloodnet": _bloodnet_main,
}
