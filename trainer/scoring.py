"""What every task on a sequence-classification head shares (reward models, classifiers): where the
model comes from, what its checkpoints say they hold, and what the run leaves at the end.

A scoring run's folder:
  checkpoints/   the loop's checkpoints; each holds `classifier.json` (number of labels, their names)
  tokenizer/     the tokenizer the run used
  adapter/       LoRA/QLoRA: the adapter (our module names; the head saved whole, PEFT modules_to_save)
  model/         an HF LlamaForSequenceClassification folder (+ tokenizer): the tuned model, LoRA merged in
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from peft import get_peft_model
from torch import nn

from model_defs import ModelConfig
from model_defs.classifier import SequenceClassifier
from model_defs.hf_classifier import is_hf_classifier_folder, load_hf_classifier, save_hf_classifier
from trainer.config import ConfigError
from trainer.export import consolidated_state_dict, load_pretrained
from trainer.loop import RunResult
from trainer.run_folder import is_checkpoint, model_source
from trainer.task import TaskContext
from trainer.tuning.save import _write_adapter, adapter_state, gather_trainable_state

CLASSIFIER_FILE = "classifier.json"


def scoring_config_problems(cfg, section: str) -> list[str]:
    method = getattr(cfg, section).method
    if method != "full" and not cfg.model.init_from:
        # The merged model/ is rebuilt from the base; a random base exists nowhere to rebuild it from.
        return [f"defaults: {section}.method={method} needs model.init_from (a pretrained causal LM or "
                "classifier to adapt); train a model from scratch with method full"]
    return []


def checkpoint_classifier(checkpoint: Path) -> dict | None:
    """A checkpoint's `classifier.json` (num_labels, id2label), None for a causal LM's checkpoint."""
    path = Path(checkpoint) / CLASSIFIER_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def classifier_files(num_labels: int, id2label: dict[int, str]) -> dict[str, str]:
    return {CLASSIFIER_FILE: json.dumps({"num_labels": num_labels,
                                         "id2label": {str(i): n for i, n in id2label.items()}}, indent=2)}


def load_classifier(init_from: str, num_labels: int, key: str = "model.init_from") -> SequenceClassifier:
    """A classifier from `init_from`: an HF sequence-classification folder or a checkpoint of ours holding
    one (its head kept, so its label count must match), or any causal LM (its trunk, with a fresh head)."""
    source = model_source(init_from)
    if is_checkpoint(source) and checkpoint_classifier(source) is not None:
        held = checkpoint_classifier(source)
        _same_labels(held["num_labels"], num_labels, source, key)
        model = SequenceClassifier(ModelConfig.from_dict(json.loads((source / "model_config.json").read_text())),
                                   num_labels)
        state = consolidated_state_dict(source)
        if any("lora_" in k or "modules_to_save" in k for k in state):
            raise ConfigError(f"{key}: {source} is a LoRA run's checkpoint; start from its merged model/ folder")
        model.load_state_dict(state, strict=True)
        return model
    if not is_checkpoint(source) and is_hf_classifier_folder(source):
        model, _ = load_hf_classifier(source)
        _same_labels(model.num_labels, num_labels, source, key)
        return model
    return SequenceClassifier.from_causal_lm(load_pretrained(source), num_labels)


def _same_labels(held: int, wanted: int, source: Path, key: str) -> None:
    if held != wanted:
        raise ConfigError(f"{key}: {source} scores {held} label(s) but this task needs {wanted}")


def make_classifier(ctx: TaskContext, num_labels: int) -> SequenceClassifier:
    if ctx.cfg.model.init_from:
        return load_classifier(ctx.cfg.model.init_from, num_labels)
    return SequenceClassifier(ctx.model_cfg, num_labels)


def _tuned_classifier(ctx: TaskContext, live: nn.Module, trainable: dict[str, torch.Tensor],
                      num_labels: int) -> SequenceClassifier:
    """The trained classifier as one plain module: the gathered weights (full tuning), or the adapter merged
    into a fresh copy of the base. The base is read again from `model.init_from` in full precision, which
    also serves QLoRA, whose own base is 4-bit."""
    if not hasattr(live, "peft_config"):
        model = SequenceClassifier(ctx.model_cfg, num_labels)
        model.load_state_dict(trainable, strict=True)
        return model
    base = make_classifier(ctx, num_labels)
    config = copy.deepcopy(live.peft_config["default"])
    config.base_model_name_or_path = None  # the rebuilt base has no name of its own; nothing is saved from it
    peft_model = get_peft_model(base, config)
    _, unexpected = peft_model.load_state_dict(trainable, strict=False)
    if unexpected:
        raise RuntimeError(f"trained weights without a place in the rebuilt model: {unexpected[:3]}")
    return peft_model.merge_and_unload()


def save_classifier_outputs(ctx: TaskContext, result: RunResult, num_labels: int, id2label: dict[int, str]) -> None:
    """adapter/ (PEFT methods) and model/, an HF sequence-classification folder with the tokenizer."""
    accelerator, out_dir, tokenizer = result.accelerator, Path(ctx.cfg.train.output_dir), ctx.data.tokenizer
    live, trainable = gather_trainable_state(accelerator, result.model)  # every rank takes part
    if accelerator.is_main_process:
        if hasattr(live, "peft_config"):
            # The run's own adapter/: a resumed run writes it again.
            _write_adapter(out_dir / "adapter", adapter_state(live, trainable), live.peft_config["default"], tokenizer)
        model = _tuned_classifier(ctx, live, trainable, num_labels)
        # The run's own model/ (a resumed run saves it again).
        save_hf_classifier(model, out_dir / "model", id2label=id2label, pad_token_id=tokenizer.pad_token_id,
                           replace=True)
        tokenizer.save_pretrained(str(out_dir / "model"))
        accelerator.print(f"{'merged ' if hasattr(live, 'peft_config') else ''}model saved to {out_dir / 'model'} "
                          "(transformers: AutoModelForSequenceClassification)")
    accelerator.wait_for_everyone()
