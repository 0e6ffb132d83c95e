"""Train the class-conditional VAE (AutoencoderKL-style CVAE) on BloodMNIST.

    accelerate launch train_scripts/train_vae.py --data-dir ../shared/data --output-dir runs/vae
    accelerate launch --multi_gpu --num_processes 2 train_scripts/train_vae.py ...   # 2 CPU processes

Writes <output-dir>/{checkpoints,samples,logs,metrics.jsonl,pipeline}; `--resume latest` continues
exactly where the last checkpoint left off. `--help` lists every option.
"""

from bloodgen_hf.training.vae import main

if __name__ == "__main__":
    main()
