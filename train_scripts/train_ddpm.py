"""Train the class-conditional DDPM (UNet2DModel, classifier-free guidance, EMA) on BloodMNIST.

    accelerate launch train_scripts/train_ddpm.py --data-dir ../shared/data --resolution 28 --output-dir runs/ddpm
    accelerate launch --multi_gpu --num_processes 2 train_scripts/train_ddpm.py ...   # 2 CPU processes
    accelerate launch train_scripts/train_ddpm.py --preset base --mixed-precision bf16 ...   # a GPU

Writes <output-dir>/{checkpoints,samples,logs,metrics.jsonl,pipeline}; `--resume latest` continues
exactly where the last checkpoint left off. `--help` lists every option.
"""

from bloodgen_hf.training.ddpm import main

if __name__ == "__main__":
    main()
