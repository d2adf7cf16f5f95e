"""lm-eval on our models: a checkpoint (or an adapter, merged) is exported to an HF folder, which
lm-eval's own `hf` model type loads, so the scores are lm-eval's, computed by transformers on our weights."""
from __future__ import annotations

import tempfile
from pathlib import Path


def run_lm_eval(model_path: str | Path, tasks: list[str], batch_size: int = 8, device: str = "cpu",
                limit: int | None = None, dtype: str = "float32") -> dict:
    try:
        import lm_eval
    except ImportError:
        raise ImportError("lm-eval is not installed: pip install -e '.[eval]'") from None
    from trainer.export import export_checkpoint, export_merged
    from trainer.run_folder import resolve

    # The same precedence as trainer.export.load_model: an adapter, else an HF folder, else a checkpoint.
    paths = resolve(model_path)
    with tempfile.TemporaryDirectory() as tmp:
        if paths.adapter is not None:
            folder = export_merged(paths.adapter, Path(tmp) / "hf")
        elif paths.model is not None:
            folder = paths.model
        else:
            folder = export_checkpoint(model_path, Path(tmp) / "hf")
        results = lm_eval.simple_evaluate(
            model="hf", model_args=f"pretrained={folder},dtype={dtype}", tasks=tasks,
            batch_size=batch_size, device=device, limit=limit)
    return results["results"]
