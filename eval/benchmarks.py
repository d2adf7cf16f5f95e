"""lm-eval benchmarks on our models, offline: task YAMLs that read local JSONL, or any task lm-eval knows
whose data is already in the HF cache (MMLU, HellaSwag, IFEval: see docs/evaluation.md).

A task file is read here with `yaml.safe_load` (no `!function` tags: data, not code), checked for the
keys lm-eval needs, and its `dataset_kwargs.data_files` resolved against the file's own folder, so a
task folder works from any working directory. lm-eval then runs it as a config dict.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

OUTPUT_TYPES = ("multiple_choice", "loglikelihood", "loglikelihood_rolling", "generate_until")
REQUIRED = ("task", "dataset_path", "output_type", "doc_to_text")


def task_files(paths: list[str | Path]) -> list[Path]:
    """YAML files named, or every *.yaml in a folder named."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(path.glob("*.yaml"))
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such task file or folder")
    if not found:
        raise FileNotFoundError(f"{', '.join(map(str, paths))}: no task YAML files")
    return found


def load_task_config(path: Path) -> dict[str, Any]:
    """One task YAML as the config dict lm-eval takes, with local data files made absolute."""
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML without tags ({str(err).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: a task file is a mapping of lm-eval task keys")
    missing = [k for k in REQUIRED if k not in config]
    if missing:
        raise ValueError(f"{path}: missing key {missing[0]}")
    if config["output_type"] not in OUTPUT_TYPES:
        raise ValueError(f"{path}: output_type: '{config['output_type']}' is not one of {', '.join(OUTPUT_TYPES)}")
    if config["output_type"] == "multiple_choice" and "doc_to_choice" not in config:
        raise ValueError(f"{path}: missing key doc_to_choice (output_type multiple_choice)")
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if config["dataset_path"] in ("json", "csv", "parquet"):
        if not files:
            raise ValueError(f"{path}: dataset_kwargs.data_files: a local dataset needs its files")
        config["dataset_kwargs"]["data_files"] = _resolve_files(path, files)
    return config


def _resolve_files(task_file: Path, files: Any) -> Any:
    if isinstance(files, dict):
        return {split: _resolve_files(task_file, f) for split, f in files.items()}
    if isinstance(files, list):
        return [_resolve_files(task_file, f) for f in files]
    resolved = (task_file.parent / str(files)).resolve()
    if not resolved.is_file():
        raise FileNotFoundError(f"{task_file}: dataset_kwargs.data_files: {resolved} does not exist")
    return str(resolved)


def run_benchmarks(model: str | Path, tasks: list[str | Path], adapter: str | None = None, batch_size: int = 8,
                   limit: int | None = None, device: str = "cpu", log_samples: bool = False,
                   apply_chat_template: bool = False) -> dict[str, Any]:
    """lm-eval's results for our model: task YAML files/folders, or names of tasks lm-eval ships.
    `apply_chat_template` renders each request through the model's chat template (instruction-tuned
    models on IFEval); off, prompts are raw text as lm-eval's tasks write them."""
    import lm_eval

    import eval.lm_eval_model  # noqa: F401  registers the model type

    configs: list[str | dict] = []
    for task in tasks:
        if Path(task).exists() or str(task).endswith((".yaml", ".yml")):
            configs += [load_task_config(f) for f in task_files([task])]
        else:
            configs.append(str(task))
    model_args = {"pretrained": str(model)}
    if adapter:
        model_args["adapter"] = str(adapter)
    return lm_eval.simple_evaluate(model="llamatrain", model_args=model_args, tasks=configs, limit=limit,
                                   batch_size=batch_size, device=device, log_samples=log_samples,
                                   apply_chat_template=apply_chat_template)


def headline_scores(results: dict[str, Any]) -> dict[str, float]:
    """`task/metric` -> value for every aggregated metric (stderr left out)."""
    scores = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            name = key.split(",")[0]
            if isinstance(value, (int, float)) and "stderr" not in name and name not in ("alias", "sample_len"):
                scores[f"{task}/{name}"] = float(value)
    return scores
