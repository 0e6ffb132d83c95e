"""Train the class-conditional VAE (AutoencoderKL-style CVAE) on BloodMNIST.

    accelerate launch train_scripts/train_vae.py --data-dir ../shared/data --output-dir runs/vae
    accelerate launch --multi_gpu --num_processes 2 train_scripts/train_vae.py ...   # 2 CPU processes

VAE v2: a ResNet with the class in every residual block, a per-class Gaussian mixture prior fitted after
training to the posterior means, and optionally an adversarial term on the reconstructions:

    accelerate launch train_scripts/train_vae.py --data-dir ../shared/data --output-dir runs/vae-v2 \
        --split train --backbone resnet --block-out-channels 32,64,128 --layers-per-block 2 \
        --prior-components 4 --adv-weight 0.1 --adv-start 2500

Refit the prior of a trained VAE alone (no training): `--fit-prior runs/vae-v2/pipeline --prior-components 8
--split train --output-dir runs/vae-v2-k8`.

Writes <output-dir>/{checkpoints,samples,logs,metrics.jsonl,pipeline}; `--resume latest` continues
exactly where the last checkpoint left off. `--help` lists every option.
"""

from bloodgen_hf.training.vae import main

if __name__ == "__main__":
    main()
