"""Chat with a model: one of our checkpoints / run folders, an HF Llama folder, or a base + SFT adapter.

    python launch/generate.py --model runs/demo/sft --prompt "How old is Beilfu?"          # SFT run folder
    python launch/generate.py --model runs/demo/pretrain --prompt "..." --prompt "..."     # newest checkpoint
    python launch/generate.py --model BASE --adapter runs/x/adapter --prompts-file prompts.jsonl --out gen.jsonl

Prompts are rendered with the tokenizer's chat template (`--raw` feeds them as plain text);
generation stops at the template's end-of-turn token or EOS.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from trainer.cli import guarded


def find_tokenizer_dir(model: str, adapter: str | None, explicit: str | None) -> Path:
    """--tokenizer, else the one that goes with the adapter, else with the model (see trainer.run_folder)."""
    from trainer.run_folder import resolve

    for name, path in (("--model", model), ("--adapter", adapter), ("--tokenizer", explicit)):
        if path and not Path(path).exists():
            raise FileNotFoundError(f"{name} {path}: no such file or folder")
    if explicit:
        return Path(explicit)
    for path in ([adapter] if adapter else []) + [model]:
        found = resolve(path).tokenizer
        if found is not None:
            return found
    raise FileNotFoundError(f"{model}: no tokenizer found beside the model; pass --tokenizer")


def check_tokenizer_fits_model(tokenizer, model) -> None:
    """A tokenizer with more ids than the model's embedding would index past it mid-generation."""
    cfg = getattr(model, "cfg", None) or getattr(getattr(model, "base_model", None), "cfg", None)
    if cfg is not None and len(tokenizer) > cfg.vocab_size:
        raise ValueError(f"tokenizer {tokenizer.name_or_path} has {len(tokenizer)} tokens but the model's vocabulary "
                         f"is {cfg.vocab_size}: it is not this model's tokenizer (pass the right --tokenizer)")


def read_prompts(args) -> list[str | list[dict]]:
    prompts: list[str | list[dict]] = list(args.prompt or [])
    if args.prompts_file:
        if not Path(args.prompts_file).is_file():
            raise FileNotFoundError(f"{args.prompts_file}: no such prompts file")
        path = Path(args.prompts_file)
        for lineno, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{lineno}: expected a JSON object with 'prompt' or 'messages'")
                if "messages" in row:  # a chat: generate the next assistant turn after its non-assistant prefix
                    msgs = row["messages"]
                    if not isinstance(msgs, list) or not all(
                            isinstance(m, dict) and isinstance(m.get("role"), str)
                            and isinstance(m.get("content"), str) for m in msgs):
                        raise ValueError(f"{path}:{lineno}: 'messages' must be a list of {{role, content}} strings")
                    cut = next((i for i in range(len(msgs) - 1, -1, -1) if msgs[i]["role"] != "assistant"), None)
                    if cut is None:
                        raise ValueError(f"{path}:{lineno}: messages hold no user turn")
                    prompts.append(msgs[:cut + 1])
                elif isinstance(row.get("prompt"), str):
                    prompts.append(row["prompt"])
                else:
                    raise ValueError(f"{path}:{lineno}: expected a string 'prompt' or a 'messages' field")
            else:
                prompts.append(line)
            if args.limit is not None and len(prompts) >= args.limit:
                break
    if not prompts:
        raise ValueError("no prompts: pass --prompt TEXT (repeatable) or --prompts-file")
    return prompts


def encode(tokenizer, prompt: str | list[dict], system: str | None, raw: bool) -> list[int]:
    from trainer.chat import prompt_ids

    if raw:
        return tokenizer(prompt if isinstance(prompt, str) else prompt[-1]["content"])["input_ids"]
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}] + messages
    return prompt_ids(tokenizer, messages)


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r)
        mask[i, T - len(r):] = True
    return ids, mask


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True,
                        help="a run folder (its adapter/, else model/, else newest checkpoint), a checkpoint, "
                             "an HF Llama folder, or an adapter folder (on its own base)")
    parser.add_argument("--adapter", help="an SFT adapter/ folder to apply on --model")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: found beside the model)")
    parser.add_argument("--chat-template", default="auto", choices=["auto", "llama3", "chatml"])
    parser.add_argument("--prompt", action="append", help="a user message (repeatable)")
    parser.add_argument("--prompts-file", help=".txt (one prompt a line) or .jsonl ('prompt' or 'messages')")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N prompts of --prompts-file")
    parser.add_argument("--system", help="a system message put before every prompt")
    parser.add_argument("--raw", action="store_true", help="no chat template: continue the text as is")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write {prompt, response} rows to this JSONL file")
    parser.add_argument("--verbose", action="store_true", help="show the libraries' warnings (hidden by default)")
    args = parser.parse_args()
    from trainer.quiet import set_verbosity

    set_verbosity(args.verbose)

    from model_defs.generate import generate
    from trainer.chat import ensure_chat_template, stop_token_ids
    from trainer.data.tokenizer import load_tokenizer
    from trainer.export import load_model

    prompts = read_prompts(args)
    tokenizer = load_tokenizer(find_tokenizer_dir(args.model, args.adapter, args.tokenizer))
    if not args.raw:
        ensure_chat_template(tokenizer, args.chat_template)
    model = load_model(args.model, args.adapter)
    check_tokenizer_fits_model(tokenizer, model)
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, mask = left_pad([encode(tokenizer, p, args.system, args.raw) for p in prompts], pad_id)
    stops = stop_token_ids(tokenizer)
    # Prompt tuning prepends virtual tokens, which the KV cache's fixed layout does not hold.
    use_cache = hasattr(model, "layers")
    out = generate(model, ids, attention_mask=mask, max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, stop_token_ids=stops,
                   pad_token_id=pad_id, generator=torch.Generator().manual_seed(args.seed), use_cache=use_cache)
    results = []
    for prompt, row in zip(prompts, out[:, ids.shape[1]:].tolist()):
        cut = next((i for i, t in enumerate(row) if t in stops), len(row))
        response = tokenizer.decode(row[:cut], skip_special_tokens=True).strip()
        shown = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        results.append({"prompt": shown, "response": response})
        print(f"### prompt\n{shown}\n### response\n{response}\n")
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results))
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main))
