"""Write-then-rename folders for everything the trainer saves (exports, adapters, data, checkpoints).

The implementation lives in `model_defs.atomic` because the standalone model package writes
its HF folders with it too, and model_defs must not import trainer.
"""
from model_defs.atomic import atomic_directory, commit_directory, is_occupied, refuse_occupied, staging_path

__all__ = ["atomic_directory", "commit_directory", "is_occupied", "refuse_occupied", "staging_path"]
