"""lm-eval on our models: one of our checkpoints is exported to an HF folder, which lm-eval's own
`hf` model type loads, so the scores are lm-eval's, computed by transformers on our weights."""
from __future__ import annotations

import tempfile
from pathlib import Path


def run_lm_eval(model_path: str | Path, tasks: list[str], batch_size: int = 8, device: str = "cpu",
                limit: int | None = None, dtype: str = "float32") -> dict:
    try:
        import lm_eval
    except ImportError:
        raise ImportError("lm-eval is not installed: pip install -e '.[eval]'") from None
    from trainer.export import export_checkpoint, is_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(model_path)
        if is_checkpoint(folder):
            folder = export_checkpoint(folder, Path(tmp) / "hf")
        results = lm_eval.simple_evaluate(
            model="hf", model_args=f"pretrained={folder},dtype={dtype}", tasks=tasks,
            batch_size=batch_size, device=device, limit=limit)
    return results["results"]
