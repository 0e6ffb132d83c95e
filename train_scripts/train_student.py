"""Distil a flow-matching DDPM or LDM teacher into a few-step student (see bloodgen_hf/training/student.py).

    bloodgen-hf sample --model runs/ddpm-v2-train/pipeline --format npz --n 20000 --out runs/pairs.npz
    accelerate launch train_scripts/train_student.py --teacher runs/ddpm-v2-train/pipeline \
        --method reflow --pairs runs/pairs.npz --output-dir runs/student
    accelerate launch train_scripts/train_student.py --teacher ... --method consistency --data-dir ../shared/data \
        --split train --output-dir runs/student-cd
    # a 64 px latent (LDM) teacher: the student draws the (noise, latent) pairs into --pairs itself, kept there (a
    # stopped draw goes on); with --adversarial-weight, the decoded 64 px estimates against real 64 px train images
    accelerate launch train_scripts/train_student.py --teacher runs/ldm/pipeline --pairs runs/ldm-pairs \
        --num-pairs 20000 --output-dir runs/ldm-student \
        [--adversarial-weight 0.5 --resolution 64 --data-dir ../shared/data]

Writes <output-dir>/{checkpoints,samples,logs,metrics.jsonl,pipeline}; `--resume latest` continues exactly.
"""

from bloodgen_hf.training.student import main

if __name__ == "__main__":
    main()
