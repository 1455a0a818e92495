r"""Fine-tune a TranscriptFormer checkpoint with LoRA adapters: the same as ``transcriptformer finetune``.

From the repository root::

    python finetune_lora.py --checkpoint-path <ckpt> --train-files <file.h5ad> --epochs 1 --batch-size 4 \\
        --lora-r 4 --lora-alpha 16 --devices 0 --output-path adapters_epoch1.pt

``--devices 0`` (the former name of ``--device 0``) trains on the CPU; ``--output-path`` names the adapter directory
written at the end (``adapter_config.json`` and ``adapter_model.safetensors``). ``--help`` lists every flag.
"""

import sys

from transcriptformer.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
