"""Train diffusers' AutoencoderKL, the first stage of the 64 px latent model (L1 + KL + patch discriminator).

    accelerate launch train_scripts/train_autoencoder.py --resolution 64 --data-dir ../shared/data \
        --output-dir runs/autoencoder-64
    accelerate launch --multi_gpu --num_processes 2 train_scripts/train_autoencoder.py ...   # 2 CPU processes

Writes <output-dir>/{checkpoints,samples,logs,metrics.jsonl,pipeline}; pipeline/ is a stock AutoencoderKL
(`AutoencoderKL.from_pretrained(".../pipeline")`) whose config's scaling_factor is 1 / std of its training
latents. `--resume latest` continues exactly where the last checkpoint left off. `--help` lists every option.
"""

from bloodgen_hf.training.autoencoder import main

if __name__ == "__main__":
    main()
