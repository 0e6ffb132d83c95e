"""Train the class-conditional latent flow model (a UNet2DModel on the latents of a frozen diffusers AutoencoderKL,
classifier-free guidance, EMA) on BloodMNIST at 64x64; it saves a BloodLDMPipeline.

    accelerate launch train_scripts/train_ldm.py --data-dir ../shared/data --autoencoder runs/ae/pipeline \
        --output-dir runs/ldm
    accelerate launch --multi_gpu --num_processes 2 train_scripts/train_ldm.py ...   # 2 CPU processes

Defaults: --resolution 64, --split train, --prediction-type flow, --balanced-batches, preset small. Writes
<output-dir>/{checkpoints,samples,logs,metrics.jsonl,pipeline}; `--resume latest` continues exactly where the last
checkpoint left off. `--help` lists every option; bloodgen_hf/training/latent.py says how the latents are made.
"""

from bloodgen_hf.training.latent import main

if __name__ == "__main__":
    main()
