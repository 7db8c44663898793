"""The reusable pieces of the fine-tuning recipes (`recipes/finetune.py`): config, data, model
modes, losses, router metrics, the training loop's components, evaluation, checkpoints and the final save."""
