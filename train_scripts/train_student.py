"""Distil a flow-matching DDPM teacher into a few-step student (see bloodgen_hf/training/student.py).

    bloodgen-hf sample --model runs/ddpm-v2-train/pipeline --format npz --n 20000 --out runs/pairs.npz
    accelerate launch train_scripts/train_student.py --teacher runs/ddpm-v2-train/pipeline \
        --method reflow --pairs runs/pairs.npz --output-dir runs/student
    accelerate launch train_scripts/train_student.py --teacher ... --method consistency --data-dir ../shared/data \
        --split train --output-dir runs/student-cd

Writes <output-dir>/{checkpoints,samples,logs,metrics.jsonl,pipeline}; `--resume latest` continues exactly.
"""

from bloodgen_hf.training.student import main

if __name__ == "__main__":
    main()
