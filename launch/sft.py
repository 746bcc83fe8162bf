"""Supervised fine-tuning entry point.

    accelerate launch --config_file configs/accelerate/cpu.yaml launch/sft.py --config configs/smollm2-135m/lora.yaml
    accelerate launch launch/sft.py --config CONFIG training.learning_rate=1e-4 data.packing=false

Every `key.sub=value` after the config overrides that key (values are parsed as YAML)."""

import sys

from ftscale.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
