"""Train BloodNet, the BloodMNIST classifier behind the domain metrics (fd_bloodnet, class accuracy).

    python train_scripts/train_bloodnet.py --data-dir ../shared/data --output-dir runs/bloodnet

Trains on the train split only, scores every epoch on val, and writes the model to
<output-dir>/pipeline/classifier (config.json + safetensors) with test_metrics.json beside it;
copy <output-dir>/pipeline to bloodgen_hf/weights/bloodnet (bloodnet-<N> for --resolution N other than 28) to
bundle it as the default evaluator at that size. `--help` lists every option.
"""

from bloodgen_hf.evaluation.bloodnet_train import main

if __name__ == "__main__":
    main()
