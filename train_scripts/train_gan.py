"""Train the conditional DCGAN on BloodMNIST.

    accelerate launch train_scripts/train_gan.py --data-dir ../shared/data --output-dir runs/gan
    accelerate launch --multi_gpu --num_processes 2 train_scripts/train_gan.py ...   # 2 CPU processes

Writes <output-dir>/{checkpoints,samples,logs,metrics.jsonl,pipeline}; `--resume latest` continues
exactly where the last checkpoint left off. `--help` lists every option.
"""

from bloodgen_hf.training.gan import main

if __name__ == "__main__":
    main()
