"""Compare runs and models: what each one cost (summary.json) and what it can do (the evaluations asked),
as comparison.csv, report.md and PNG figures. `launch/compare.py` is the command line."""
from __future__ import annotations

import csv
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainer.run_folder import resolve

EFFICIENCY = ("method", "trainable_params", "trainable_share", "wall_time_s", "tokens_per_s", "peak_host_rss_gb",
              "peak_gpu_gb", "output_bytes", "final_train_loss", "final_val_loss", "generation_tokens_per_s")
# The judges' columns: a model's pairwise result against its opponent (`judge/vs`) and its reward-model
# score (win rate against `reward/vs`); each figure with its 95% bootstrap interval.
JUDGE_COLUMNS = ("judge/vs", "judge/win", "judge/win_low", "judge/win_high", "judge/tie", "judge/tie_low",
                 "judge/tie_high", "judge/loss", "judge/loss_low", "judge/loss_high", "judge/same_position",
                 "judge/n", "reward/mean", "reward/mean_low", "reward/mean_high", "reward/vs", "reward/win_rate",
                 "reward/win_rate_low", "reward/win_rate_high", "reward/n")


@dataclass
class Entry:
    """One model in the comparison: its label, what it is, and every figure found for it."""

    label: str
    path: Path
    summary: dict[str, Any] = field(default_factory=dict)
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # train / val loss by step
    figures: dict[str, float] = field(default_factory=dict)
    samples: list[tuple[str, str]] = field(default_factory=list)
    judged: dict[str, Any] = field(default_factory=dict)  # JUDGE_COLUMNS found for it


def read_entry(path: str | Path, label: str) -> Entry:
    """A run folder (its summary.json and metrics.jsonl are required) or a model path (none)."""
    from trainer.summary import read_summary

    paths = resolve(path)
    entry = Entry(label=label, path=Path(path))
    if paths.is_run:
        metrics = Path(path) / "metrics.jsonl"
        if not metrics.is_file():
            raise FileNotFoundError(f"{path}: run folder has no metrics.jsonl")
        entry.summary = read_summary(path)
        for line_no, line in enumerate(metrics.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{metrics}:{line_no}: not valid JSON") from None
            loss = record.get("loss")
            if isinstance(loss, (int, float)) and math.isfinite(loss):
                entry.curves.setdefault(record.get("split", "train"), []).append((record["step"], float(loss)))
    return entry


def efficiency_row(entry: Entry) -> dict[str, Any]:
    s = entry.summary
    peak = s.get("peak_memory_gb") or {}
    return {"method": s.get("method", "-"), "trainable_params": s.get("trainable_params"),
            "trainable_share": s.get("trainable_share"), "wall_time_s": s.get("wall_time_s"),
            "tokens_per_s": s.get("tokens_per_s"), "peak_host_rss_gb": peak.get("host_rss"),
            "peak_gpu_gb": peak.get("gpu"), "output_bytes": (s.get("output") or {}).get("bytes"),
            "final_train_loss": (s.get("final_train") or {}).get("loss"),
            "final_val_loss": (s.get("final_val") or {}).get("loss"),
            "generation_tokens_per_s": entry.figures.get("generation_tokens_per_s",
                                                         s.get("generation_tokens_per_s"))}


# ------------------------------------------------------------------------------- evaluations


def load_for_eval(entry: Entry):
    """(model, tokenizer) of an entry; a model that cannot be loaded is one line naming it."""
    from eval.lm_eval_model import find_tokenizer
    from trainer.data.tokenizer import load_tokenizer
    from trainer.export import load_model

    try:
        model = load_model(entry.path).eval()
        tokenizer = load_tokenizer(find_tokenizer(entry.path))
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ValueError(f"{entry.path}: cannot be loaded ({str(err).splitlines()[0]})") from None
    return model, tokenizer


@torch.no_grad()
def preference_accuracy(model, tokenizer, pairs_file: str | Path, max_len: int = 256,
                        max_prompt_len: int = 128) -> dict[str, float]:
    """How often the model itself gives the chosen response a higher log-probability than the rejected
    one, chat-rendered as DPO trains; no reference model involved (the policy's own preference)."""
    from trainer.chat import ensure_chat_template
    from trainer.dpo.data import load_pairs, tokenize_pairs

    ensure_chat_template(tokenizer, "auto")
    pairs = tokenize_pairs(tokenizer, load_pairs([pairs_file], key="--pairs"), max_len=max_len,
                           max_prompt_len=max_prompt_len)
    correct, margins = 0, []
    for pair in pairs:
        logps = [_response_logp(model, pair.prompt, response) for response in (pair.chosen, pair.rejected)]
        correct += logps[0] > logps[1]
        margins.append(logps[0] - logps[1])
    return {"pref_accuracy": correct / len(pairs), "pref_margin": sum(margins) / len(margins)}


def _response_logp(model, prompt, response) -> float:
    ids = torch.tensor([list(prompt) + list(response)])
    logps = torch.log_softmax(model(ids[:, :-1]).float(), dim=-1)[0]
    targets = ids[0, 1:]
    picked = logps.gather(-1, targets[:, None])[:, 0]
    return float(picked[len(prompt) - 1:].sum())


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: list[str], chat: bool, max_new_tokens: int = 48) -> list[str]:
    """Greedy answers through our KV cache: chat-rendered prompts, or raw text continued."""
    from model_defs.generate import generate
    from trainer.chat import ensure_chat_template, prompt_ids, stop_token_ids

    if chat:
        ensure_chat_template(tokenizer, "auto")
        rows = [prompt_ids(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
        stops = stop_token_ids(tokenizer)
    else:
        rows = [tokenizer(p)["input_ids"] for p in prompts]
        stops = [tokenizer.eos_token_id]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = True
    out = generate(model, ids, attention_mask=mask, max_new_tokens=max_new_tokens, stop_token_ids=stops,
                   pad_token_id=pad, use_cache=hasattr(model, "layers"))
    texts = []
    for row in out[:, width:].tolist():
        cut = next((i for i, t in enumerate(row) if t in stops), len(row))
        texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    return texts


def measured_generation_speed(model, vocab_size: int) -> float:
    from trainer.summary import generation_tokens_per_s

    return generation_tokens_per_s(model, vocab_size)


def record_pairwise(entry: Entry, opponent: str, result: dict[str, Any]) -> None:
    entry.judged["judge/vs"] = opponent
    for outcome in ("win", "tie", "loss"):
        _record_interval(entry, f"judge/{outcome}", result[outcome])
    entry.judged["judge/same_position"] = result["same_position"]
    entry.judged["judge/n"] = result["n"]


def record_reward(entry: Entry, mean: dict[str, float], n: int, opponent: str | None = None,
                  win_rate: dict[str, float] | None = None) -> None:
    _record_interval(entry, "reward/mean", mean)
    entry.judged["reward/n"] = n
    if opponent is not None:
        entry.judged["reward/vs"] = opponent
        _record_interval(entry, "reward/win_rate", win_rate)


def _record_interval(entry: Entry, name: str, interval: dict[str, float]) -> None:
    entry.judged.update({name: interval["value"], f"{name}_low": interval["low"], f"{name}_high": interval["high"]})


def run_judges(entries: list[Entry], prompts: list[str], answers: dict[str, list[str]], *, prompts_file: str,
               judge: str | None, reward_judge, against: str, attempt, skipped: list[str]) -> list[str]:
    """Both judges over every model's answers, recorded on the entries. `attempt(what, fn, *args)` runs
    one judgement (stopping the command, or with --keep-going listing it in `skipped`); a comparison whose
    answers are missing is listed in `skipped`. Returns the lines that say what the tables measure."""
    from eval import judge as J

    if not prompts:
        return []
    by_label = {e.label: e for e in entries}
    pairs = J.opponents([e.label for e in entries], against)
    rival = "the first model" if against == "first" else "the model before it"
    notes = []
    if judge:
        chat_judge = attempt(f"judge {judge}: load", J.ChatJudge, judge)
        for label, opponent in pairs if chat_judge is not None else []:
            if label not in answers or opponent not in answers:
                skipped.append(f"judge: `{label}` vs `{opponent}`: no answers from "
                               f"`{label if label not in answers else opponent}` (see above)")
                continue
            result = attempt(f"judge: `{label}` vs `{opponent}`", J.pairwise, chat_judge, prompts, answers[label],
                             answers[opponent])
            if result is not None:
                record_pairwise(by_label[label], opponent, result)
        notes.append(f"- Pairwise judge `{judge}` over the {len(prompts)} prompts of `{prompts_file}`, "
                     f"each model against {rival}: each pair judged in both orders, a win needs both; "
                     "95% bootstrap intervals over prompts. A judge that prefers a position shows as ties "
                     "(last column: how often it chose the same position in both orders).")
    if reward_judge is not None:
        scores = {}
        for label, texts in answers.items():
            found = attempt(f"reward judge: `{label}`", reward_judge.scores, prompts, texts)
            if found is not None:
                scores[label] = found
        for entry in entries:
            if entry.label in scores:
                record_reward(entry, J.bootstrap(scores[entry.label]).as_dict(), len(prompts))
        for label, opponent in pairs:
            if label in scores and opponent in scores:
                result = J.reward_judge(scores[label], scores[opponent])
                record_reward(by_label[label], result["mean_a"], result["n"], opponent, result["win_rate_a"])
            elif label in answers and opponent in answers:
                continue  # a scoring failure, already listed as skipped
            else:
                skipped.append(f"reward judge: `{label}` vs `{opponent}`: no answers from "
                               f"`{label if label not in answers else opponent}` (see above)")
        notes.append(f"- Reward model `{reward_judge.path}` scores every model's answers to the same prompts: "
                     f"mean score, and the share of prompts where a model scores above {rival} "
                     "(equal scores count half); 95% bootstrap intervals over prompts.")
    return notes


# ------------------------------------------------------------------------------- outputs


def write_csv(entries: list[Entry], metric_names: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    judged = [c for c in JUDGE_COLUMNS if any(c in e.judged for e in entries)]
    writer.writerow(["label", "path", *EFFICIENCY, *metric_names, *judged])
    for e in entries:
        eff = efficiency_row(e)
        writer.writerow([e.label, str(e.path), *(_cell(eff[k]) for k in EFFICIENCY),
                         *(_cell(e.figures.get(m)) for m in metric_names), *(_cell(e.judged.get(c)) for c in judged)])
    return buffer.getvalue()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _fmt(value: Any, kind: str = "") -> str:
    if value is None:
        return "-"
    if kind == "bytes":
        return f"{value / 2**20:.2f} MiB" if value >= 2**20 else f"{value / 2**10:.1f} KiB"
    if kind == "share":
        return f"{100 * value:.3f}%"
    if isinstance(value, float):
        return f"{value:.4g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def markdown_report(entries: list[Entry], metric_names: list[str], skipped: list[str], notes: list[str],
                    judge_notes: list[str], figures: list[str]) -> str:
    lines = ["# Comparison", ""]
    if skipped:
        lines += ["**Skipped (not in the figures below):**", ""] + [f"- {s}" for s in skipped] + [""]
    lines += ["Models: " + ", ".join(f"`{e.label}` ({e.path})" for e in entries), ""]
    lines += ["## Cost", "", ("| model | method | trainable params | share | wall time | train tok/s | peak RSS |"
                              " saved size | final train loss | final val loss | generation tok/s |"),
              "|" + "---|" * 11]
    for e in entries:
        r = efficiency_row(e)
        lines.append(f"| {e.label} | {r['method']} | {_fmt(r['trainable_params'])} | "
                     f"{_fmt(r['trainable_share'], 'share')} | {_fmt(r['wall_time_s'])} s | {_fmt(r['tokens_per_s'])} | "
                     f"{_fmt(r['peak_host_rss_gb'])} GiB | {_fmt(r['output_bytes'], 'bytes')} | "
                     f"{_fmt(r['final_train_loss'])} | {_fmt(r['final_val_loss'])} | "
                     f"{_fmt(r['generation_tokens_per_s'])} |")
    if metric_names:
        lines += ["", "## Evaluations", "", "| model | " + " | ".join(metric_names) + " |",
                  "|" + "---|" * (len(metric_names) + 1)]
        for e in entries:
            lines.append(f"| {e.label} | " + " | ".join(_fmt(e.figures.get(m)) for m in metric_names) + " |")
    if notes:
        lines += ["", "What the figures measure:", ""] + [f"- {n}" for n in notes]
    if judge_notes or any(e.judged for e in entries):
        lines += ["", "## Judges", ""] + judge_notes + judge_tables(entries)
    if any(e.samples for e in entries):
        lines += ["", "## Samples (greedy)", ""]
        for e in entries:
            for prompt, text in e.samples:
                lines.append(f"- `{e.label}` | {prompt!r} -> {text!r}")
    if figures:
        lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def judge_tables(entries: list[Entry]) -> list[str]:
    lines = []
    pairwise = [e for e in entries if "judge/vs" in e.judged]
    if pairwise:
        lines += ["", "| model | against | win | tie | loss | same position in both orders | prompts |",
                  "|" + "---|" * 7]
        lines += [f"| {e.label} | {e.judged['judge/vs']} | {_ci(e.judged, 'judge/win')} | {_ci(e.judged, 'judge/tie')} | "
                  f"{_ci(e.judged, 'judge/loss')} | {100 * e.judged['judge/same_position']:.0f}% | "
                  f"{e.judged['judge/n']} |" for e in pairwise]
    scored = [e for e in entries if "reward/mean" in e.judged]
    if scored:
        lines += ["", "| model | mean reward | against | win rate | prompts |", "|" + "---|" * 5]
        lines += [f"| {e.label} | {_ci(e.judged, 'reward/mean')} | {e.judged.get('reward/vs', '-')} | "
                  f"{_ci(e.judged, 'reward/win_rate') if 'reward/vs' in e.judged else '-'} | {e.judged['reward/n']} |"
                  for e in scored]
    return lines


def _ci(judged: dict[str, Any], name: str) -> str:
    return f"{judged[name]:.3g} [{judged[f'{name}_low']:.3g}, {judged[f'{name}_high']:.3g}]"


def draw_figures(entries: list[Entry], metric_names: list[str], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    written = []
    runs = [e for e in entries if e.curves]
    if runs:
        fig, ax = plt.subplots(figsize=(7, 4))
        for e in runs:
            for split, style in (("train", "-"), ("val", "--")):
                if e.curves.get(split):
                    steps, losses = zip(*e.curves[split])
                    ax.plot(steps, losses, style, marker="o" if split == "val" else None, label=f"{e.label} {split}")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title("loss curves (each run's own objective)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "loss_curves.png", dpi=110)
        plt.close(fig)
        written.append("loss_curves.png")
    if metric_names:
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(metric_names) * len(entries) / 2), 4))
        width = 0.8 / len(entries)
        for i, e in enumerate(entries):
            values = [e.figures.get(m, float("nan")) for m in metric_names]
            ax.bar([j + i * width for j in range(len(metric_names))], values, width, label=e.label)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(metric_names))], metric_names, rotation=20,
                      ha="right", fontsize=7)
        ax.legend(fontsize=7)
        ax.set_title("evaluations")
        fig.tight_layout()
        fig.savefig(out / "metrics.png", dpi=110)
        plt.close(fig)
        written.append("metrics.png")
    runs = [e for e in entries if e.summary]
    if runs:
        keys = [("trainable_params", "trainable params"), ("wall_time_s", "wall time (s)"),
                ("output_bytes", "saved size (bytes)"), ("generation_tokens_per_s", "generation tok/s")]
        fig, axes = plt.subplots(1, len(keys), figsize=(3 * len(keys), 3.2))
        for ax, (key, title) in zip(axes, keys):
            values = [efficiency_row(e)[key] or 0 for e in runs]
            ax.bar([e.label for e in runs], values, color="tab:gray")
            ax.set_title(title, fontsize=9)
            ax.tick_params(axis="x", labelrotation=30, labelsize=7)
            if key in ("trainable_params", "output_bytes") and max(values) > 0:
                ax.set_yscale("log")
        fig.tight_layout()
        fig.savefig(out / "efficiency.png", dpi=110)
        plt.close(fig)
        written.append("efficiency.png")
    if any(e.judged for e in entries):
        draw_judges(plt, entries, out)
        written.append("judges.png")
    return written


def draw_judges(plt, entries: list[Entry], out: Path) -> None:
    """Pairwise win / tie / loss as stacked bars (win's interval as an error bar); mean reward per model."""
    pairwise = [e for e in entries if "judge/vs" in e.judged]
    scored = [e for e in entries if "reward/mean" in e.judged]
    panels = [p for p in (pairwise, scored) if p]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    axes = list(axes[0])
    if pairwise:
        ax = axes.pop(0)
        names = [f"{e.label}\nvs {e.judged['judge/vs']}" for e in pairwise]
        bottom = [0.0] * len(pairwise)
        for outcome, color in (("win", "tab:green"), ("tie", "tab:gray"), ("loss", "tab:red")):
            values = [e.judged[f"judge/{outcome}"] for e in pairwise]
            ax.bar(names, values, bottom=bottom, color=color, label=outcome)
            bottom = [b + v for b, v in zip(bottom, values)]
        win = [e.judged["judge/win"] for e in pairwise]
        ax.errorbar(names, win, yerr=[[w - e.judged["judge/win_low"] for w, e in zip(win, pairwise)],
                                      [e.judged["judge/win_high"] - w for w, e in zip(win, pairwise)]],
                    fmt="none", ecolor="black", capsize=4)
        ax.set_ylim(0, 1)
        ax.set_title("pairwise judge, both orders (95% CI on win)", fontsize=9)
        ax.legend(fontsize=7)
    if scored:
        ax = axes.pop(0)
        means = [e.judged["reward/mean"] for e in scored]
        # Points, not bars: a reward's zero is arbitrary, so bar heights from it would mean nothing.
        ax.errorbar([e.label for e in scored], means, fmt="o", color="tab:blue", capsize=4,
                    yerr=[[m - e.judged["reward/mean_low"] for m, e in zip(means, scored)],
                          [e.judged["reward/mean_high"] - m for m, e in zip(means, scored)]])
        ax.margins(x=0.3)
        ax.set_title("reward model: mean score (95% CI)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "judges.png", dpi=110)
    plt.close(fig)


def elapsed(start: float) -> str:
    return f"{time.perf_counter() - start:.1f}s"
