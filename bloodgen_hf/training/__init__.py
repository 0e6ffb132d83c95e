"""Training: one shared loop (`core`) and a TrainTask per model family."""

from __future__ import annotations


def _gan_main(argv: list[str]):
    from bloodgen_hf.training.gan import main

    return main(argv)


def _ddpm_main(argv: list[str]):
    from bloodgen_hf.training.ddpm import main

    return main(argv)


def _vae_main(argv: list[str]):
    from bloodgen_hf.training.vae import main

    return main(argv)


def _ldm_main(argv: list[str]):
    from bloodgen_hf.training.latent import main

    return main(argv)


def _student_main(argv: list[str]):
    from bloodgen_hf.training.student import main

    return main(argv)


def _autoencoder_main(argv: list[str]):
    from bloodgen_hf.training.autoencoder import main

    return main(argv)


def _bloodnet_main(argv: list[str]):
    from bloodgen_hf.evaluation.bloodnet_train import main

    return main(argv)


# family name -> main(argv); used by `bloodgen-hf train <family>`
TRAIN_ENTRY_POINTS = {
    "gan": _gan_main,
    "ddpm": _ddpm_main,
    "vae": _vae_main,
    "ldm": _ldm_main,
    "student": _student_main,
    "autoencoder": _autoencoder_main,
    "bloodnet": _bloodnet_main,
}
