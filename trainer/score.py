"""Score rows with a sequence-classification model (a reward model, a classifier): the work of launch/score.py.

Rows (told apart by their keys):
  {"prompt": str | messages, "response": str}   a prompt and the assistant response to score
  {"messages": [..., {"role": "assistant"}]}     the last message is the response scored
  {"text": str}                                  plain text, as classification trains on it

A chat row is rendered by reward training's own code (`tokenize_pairs`): the prompt through the
assistant header, then the response with its end-of-turn token, cut to the length limits as
training cuts a pair. A text row is `encode_texts`'s ids (+ EOS). Each sequence is scored at its
last token, as in training, so a pair scored here gets the scores the reward objective computed.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from model_defs.classifier import SequenceClassifier
from model_defs.hf_classifier import is_hf_classifier_folder, load_hf_classifier
from trainer.atomic import staging_path
from trainer.chat import ChatFormatError, ensure_chat_template, validate_messages
from trainer.classify.data import encode_texts
from trainer.config import ConfigError
from trainer.data.sources import DataError
from trainer.dpo.data import PairReport, PreferencePair, tokenize_pairs
from trainer.run_folder import resolve
from trainer.sft.data import iter_rows

DEFAULT_MAX_LEN = 1024
# Sequences sorted by length within this many batches: little padding, and the order stays local.
WINDOW_BATCHES = 64
_ROW_SHAPES = "'prompt' + 'response', 'messages' (ending in the assistant turn) or 'text'"


# ----------------------------------------------------------------------------- the model


@dataclass
class ClassifierSource:
    """Where a sequence classifier's weights are, what it scores, and what goes with it."""

    weights: Path                # an HF LlamaForSequenceClassification folder or one of our checkpoints
    is_hf: bool
    id2label: dict[int, str]
    tokenizer: Path | None
    run_config: dict[str, Any]   # the run's config.yaml ({} outside a run)

    @property
    def num_labels(self) -> int:
        return len(self.id2label)


def find_classifier(path: str | Path) -> ClassifierSource:
    """The classifier `path` stands for: an HF folder, a run's model/ (else its newest checkpoint), a checkpoint.

    Reads only configs, so a wrong path fails before any data or weights are read."""
    paths = resolve(path)
    weights = paths.model or paths.checkpoint  # a run folder's model/ comes before its checkpoints
    if weights is None:
        if paths.is_run:
            raise FileNotFoundError(f"{path}: run folder has neither a model/ folder nor a complete checkpoint")
        if paths.adapter is not None:
            raise ValueError(f"{path}: a PEFT adapter, not a model; score the run's merged model/ folder")
        raise FileNotFoundError(f"{path}: neither an HF model folder (no config.json) nor a checkpoint of ours")
    where = f"{path}" if Path(path) == weights else f"{path}: {weights}"
    if weights == paths.model:
        if not is_hf_classifier_folder(weights):
            archs = json.loads((weights / "config.json").read_text()).get("architectures") or []
            if any(a.endswith("ForCausalLM") for a in archs):
                raise ValueError(f"{where} holds a causal LM ({', '.join(archs)}), not a sequence classifier; "
                                 "score with a reward or classify run's model")
            raise ValueError(f"{where} holds a {' / '.join(archs) or 'model of no named architecture'}, "
                             "not a LlamaForSequenceClassification")
        hf_config = json.loads((weights / "config.json").read_text())
        names = hf_config.get("id2label") or {}
        n = len(names) or int(hf_config.get("num_labels", 1))
        id2label = {i: names.get(str(i), f"LABEL_{i}") for i in range(n)}
        is_hf = True
    else:
        from trainer.scoring import checkpoint_classifier  # with peft: seconds of import an HF folder never needs

        held = checkpoint_classifier(weights)
        if held is None:
            raise ValueError(f"{where} holds a causal LM checkpoint (no classifier.json), not a sequence "
                             "classifier; score with a reward or classify run's model")
        id2label = {int(i): name for i, name in held["id2label"].items()}
        is_hf = False
    run_config = {}
    if paths.run is not None and (paths.run / "config.yaml").is_file():
        run_config = yaml.safe_load((paths.run / "config.yaml").read_text()) or {}
    tokenizer = resolve(weights).tokenizer or paths.tokenizer
    return ClassifierSource(weights, is_hf, id2label, tokenizer, run_config)


def length_limits(source: ClassifierSource, max_len: int | None, max_prompt_len: int | None) -> tuple[int, int]:
    """(max_len, max_prompt_len): as given, else the run's `data.seq_len` / `reward.max_prompt_len` (what
    training cut pairs to), else 1024 and half of max_len."""
    cfg = source.run_config
    if max_len is None:
        max_len = int((cfg.get("data") or {}).get("seq_len") or DEFAULT_MAX_LEN)
    if max_prompt_len is None:
        run_value = (cfg.get("reward") or {}).get("max_prompt_len")
        max_prompt_len = int(run_value) if run_value and run_value < max_len else max_len // 2
    if max_len < 2:
        raise ValueError(f"--max-len must leave room for a token and the end token, got {max_len}")
    if not 0 < max_prompt_len < max_len:
        raise ValueError(f"--max-prompt-len ({max_prompt_len}) must be positive and below --max-len ({max_len})")
    return max_len, max_prompt_len


def load_scoring_model(source: ClassifierSource, device: torch.device, dtype: torch.dtype) -> SequenceClassifier:
    if source.is_hf:
        # An explicit dtype: a folder saved in bf16 would otherwise score in bf16 on CPU too.
        model, _ = load_hf_classifier(source.weights, dtype=dtype, device=device)
    else:
        from trainer.scoring import load_classifier

        try:
            model = load_classifier(str(source.weights), source.num_labels, key="--model")
        except ConfigError as err:  # the CLI's guard would print it as a config problem
            raise ValueError(str(err)) from None
        model = model.to(device=device, dtype=dtype)
    if model.num_labels != source.num_labels:
        raise ValueError(f"{source.weights}: the config names {source.num_labels} label(s) but the head scores "
                         f"{model.num_labels}")
    return model.eval()


# ----------------------------------------------------------------------------- rows


@dataclass
class ScoreRow:
    where: str
    row: dict[str, Any]
    pair: PreferencePair | None = None  # chat rows: chosen == rejected == the response
    text: str | None = None


@dataclass
class ScoreReport:
    rows: int = 0
    skipped: int = 0
    truncated: int = 0
    examples: list[str] = field(default_factory=list)

    def skip(self, problem: str) -> None:
        self.skipped += 1
        if len(self.examples) < 5:
            self.examples.append(problem)


def parse_score_row(row: Any) -> PreferencePair | str:
    """A chat row's (prompt, response) as a pair whose two sides are the response, or a text row's text.
    ChatFormatError says what is wrong with the row."""
    if not isinstance(row, dict):
        raise ChatFormatError(getattr(row, "problem", None) or f"expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        messages = validate_messages(row["messages"])
        if messages[-1]["role"] != "assistant":
            raise ChatFormatError(f"the last message is the response scored and must be the assistant's, "
                                  f"got role '{messages[-1]['role']}'")
        messages = _role_content(messages)
        prompt, response = messages[:-1], messages[-1]["content"]
    elif "prompt" in row or "response" in row:
        missing = [k for k in ("prompt", "response") if row.get(k) is None]
        if missing:
            raise ChatFormatError(f"missing {' and '.join(repr(k) for k in missing)}")
        prompt, response = row["prompt"], row["response"]
        if not isinstance(response, str):
            raise ChatFormatError(f"'response' must be a string, got {type(response).__name__}")
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]  # as preference data reads a string prompt
        elif isinstance(prompt, list):
            try:
                validate_messages(prompt + [{"role": "assistant", "content": response}])
            except ChatFormatError as err:
                raise ChatFormatError(f"'prompt': {err}") from None
            prompt = _role_content(prompt)
        else:
            raise ChatFormatError(f"'prompt' must be a string or a list of messages, got {type(prompt).__name__}")
    elif "text" in row:
        text = row["text"]
        if not isinstance(text, str):
            raise ChatFormatError(f"'text' must be a string, got {type(text).__name__}")
        if not text.strip():
            raise ChatFormatError("empty text")
        return text
    else:
        raise ChatFormatError(f"expected {_ROW_SHAPES}; the row has {', '.join(sorted(row)) or 'no fields'}")
    if not response.strip():
        raise ChatFormatError("empty response")
    return PreferencePair(prompt, response, response)


def _role_content(messages: list[dict]) -> list[dict]:
    # Preference data keeps only these two keys; other keys would reach the template and could change it.
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_score_rows(path: str | Path, *, skip_bad_rows: bool, output_fields: Sequence[str],
                    report: ScoreReport) -> list[ScoreRow]:
    """Every usable row of `path` in order; a bad one raises DataError naming file:line, or is counted."""
    out = []
    for where, row in iter_rows(path):
        report.rows += 1
        try:
            parsed = parse_score_row(row)
        except ChatFormatError as err:
            if not skip_bad_rows:
                raise DataError(f"{where}: {err} (pass --skip-bad-rows to skip such rows)") from None
            report.skip(f"{where}: {err}")
            continue
        taken = [f for f in output_fields if f in row]
        if taken:
            # Not a bad row to skip: every row of such a file would lose the field it already has.
            raise DataError(f"{where}: the row already has a '{taken[0]}' field; name the output field "
                            "otherwise (--field / --label-field / --scores-field)")
        if isinstance(parsed, str):
            out.append(ScoreRow(where, row, text=parsed))
        else:
            parsed.where = where
            out.append(ScoreRow(where, row, pair=parsed))
    if report.rows == 0:
        raise DataError(f"{path}: no rows")
    if not out:
        raise DataError(f"{path}: no usable row ({report.skipped} bad rows skipped, e.g. {report.examples[0]})")
    return out


def tokenize_score_rows(tokenizer, rows: Sequence[ScoreRow], *, max_len: int, max_prompt_len: int,
                        chat_template: str, report: ScoreReport) -> list[np.ndarray]:
    """The token ids scored for each row (see the module docstring)."""
    seqs: list[np.ndarray | None] = [None] * len(rows)
    chat = [i for i, r in enumerate(rows) if r.pair is not None]
    if chat:
        ensure_chat_template(tokenizer, chat_template)  # only then: a text classifier's tokenizer may have none
        pair_report = PairReport()
        tokens = tokenize_pairs(tokenizer, [rows[i].pair for i in chat], max_len=max_len,
                                max_prompt_len=max_prompt_len, overlong="truncate", report=pair_report,
                                section="score")
        report.truncated += pair_report.truncated
        for i, t in zip(chat, tokens, strict=True):
            seqs[i] = np.concatenate([t.prompt, t.chosen])
    texts = [i for i, r in enumerate(rows) if r.text is not None]
    encoded = encode_texts(tokenizer, [rows[i].text for i in texts], max_len)
    for i, (ids, truncated) in zip(texts, encoded, strict=True):
        seqs[i] = np.asarray(ids, dtype=np.int64)
        report.truncated += truncated
    return seqs  # type: ignore[return-value]


# ----------------------------------------------------------------------------- scoring and writing


def _right_pad(seqs: Sequence[np.ndarray], pad_id: int, multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(s) for s in seqs)
    T = -(-longest // multiple) * multiple
    ids = np.full((len(seqs), T), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), T), dtype=np.int64)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = s
        mask[b, :len(s)] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


@torch.no_grad()
def score_sequences(model: SequenceClassifier, seqs: Sequence[np.ndarray], *, batch_size: int, pad_id: int,
                    advance: Callable[[int], None] = lambda n: None) -> np.ndarray:
    """(N, num_labels) fp32 logits, in the order of `seqs`."""
    device = next(model.parameters()).device
    # Training pads GPU batches to multiples of 8 (tensor-core shapes) and CPU ones not at all.
    multiple = 8 if device.type == "cuda" else 1
    out = np.zeros((len(seqs), model.num_labels), dtype=np.float32)
    window = batch_size * WINDOW_BATCHES
    for start in range(0, len(seqs), window):
        order = sorted(range(start, min(start + window, len(seqs))), key=lambda i: -len(seqs[i]))
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            ids, mask = _right_pad([seqs[i] for i in idx], pad_id, multiple)
            logits = model(ids.to(device), attention_mask=mask.to(device))  # (B, num_labels)
            out[idx] = logits.float().cpu().numpy()
            advance(len(idx))
    return out


def scored_rows(rows: Sequence[ScoreRow], logits: np.ndarray, id2label: dict[int, str], *, field_name: str,
                label_field: str, scores_field: str) -> list[dict[str, Any]]:
    """Each row as read plus its score (one label) or its argmax label name and every label's logit."""
    out = []
    for r, row_logits in zip(rows, logits, strict=True):
        if len(id2label) == 1:
            out.append({**r.row, field_name: float(row_logits[0])})
        else:
            out.append({**r.row, label_field: id2label[int(np.argmax(row_logits))],
                        scores_field: {id2label[i]: float(v) for i, v in enumerate(row_logits)}})
    return out


def check_output(input_path: str | Path, output_path: str | Path, overwrite: bool) -> None:
    """Refusals made before any work: writing over the input, or over an existing file without --overwrite."""
    inp, out = Path(input_path), Path(output_path)
    # samefile also catches a hard link or a second name of the input.
    same = out.resolve() == inp.resolve() or (out.exists() and inp.exists() and os.path.samefile(inp, out))
    if same:
        raise ValueError(f"{out}: the output would replace the input; write it elsewhere")
    if out.is_dir():
        raise ValueError(f"{out}: is a folder; the output is a JSONL file")
    if out.exists() and not overwrite:
        raise ValueError(f"{out}: already exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{out.parent}: no such folder for the output")


def write_jsonl_atomic(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    """The file appears whole or not at all: written beside it, then renamed onto it."""
    path = Path(path)
    tmp = staging_path(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
