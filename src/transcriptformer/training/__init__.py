"""Training from scratch and LoRA fine-tuning with Lightning and ``peft``.

* :mod:`~transcriptformer.training.run`: :func:`run_pretraining` (``transcriptformer train``),
  :func:`run_finetuning` (``transcriptformer finetune``), :func:`merge_adapters_into_checkpoint`.
* :mod:`~transcriptformer.training.config`: the typed settings and their Hydra composition.
* :mod:`~transcriptformer.training.objective`, :mod:`~transcriptformer.training.module`,
  :mod:`~transcriptformer.training.datamodule`, :mod:`~transcriptformer.training.trainer`: the loss, the
  LightningModule, the data and the Trainer.

LoRA adapters themselves (add, save, load, merge) live with the model, in :mod:`transcriptformer.model.lora`.
The submodules are imported on demand, so that the command line starts fast.
"""
