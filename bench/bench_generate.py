"""Batched generation throughput: our KV-cache `generate` vs transformers' `generate` on the same model.

One model, two runtimes: a random-weight model of `--preset` shape is built with our code, saved as an
HF Llama folder, and loaded by transformers (`LlamaForCausalLM`, its default dynamic cache) and by us
(`load_hf_model`), so both hold the same weights in the same dtype. Both continue the same left-padded
batch of prompts (lengths drawn between `--prompt-len`/2 and `--prompt-len`) by exactly `--new-tokens`
tokens (no stop token: transformers gets `min_new_tokens` and no EOS, ours no stop ids), greedy by
default or sampled with `--temperature/--top-p`. Greedy outputs are compared token for token (the share
of equal rows is reported; fp32 near-ties may split a row).

Rounds alternate which contender goes first, in one process (same threads, same allocator); each
round times one `generate` call per contender after a warm-up call. Figures: generated tokens/s on
wall time and on process CPU time (which other processes' load does not inflate), median [min-max]
over rounds, and the per-round ratio ours / transformers. The 1-minute load average is sampled every
2 s. A contender that fails fails the bench (non-zero exit). `--json PATH` writes every figure.

    python bench/bench_generate.py --threads 1 --rounds 5
    python bench/bench_generate.py --device cuda --preset 125m --batch 32 --prompt-len 256 --new-tokens 128
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch

from bench.common import LoadSampler, fmt_spread, spread

CONTENDERS = ("ours", "transformers")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="debug", help="model_defs preset for the model's shape")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.rounds < 3:
        p.error("--rounds must be at least 3")
    return args


def build(args, folder: Path, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaForCausalLM

    from model_defs import ModelConfig, Transformer
    from model_defs.hf import load_hf_model, save_hf_model

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(args.preset, attention="sdpa")
    save_hf_model(Transformer(cfg), cfg, folder)
    ours = load_hf_model(folder, dtype=dtype, device=device).eval()
    theirs = LlamaForCausalLM.from_pretrained(str(folder), dtype=dtype, attn_implementation="sdpa").to(device).eval()
    return cfg, ours, theirs


def prompts(args, vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(max(1, args.prompt_len // 2), args.prompt_len + 1, (args.batch,), generator=g)
    ids = torch.zeros((args.batch, args.prompt_len), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths.tolist()):
        ids[i, -n:] = torch.randint(1, vocab, (n,), generator=g)
        mask[i, -n:] = 1
    return ids.to(device), mask.to(device)


def run_ours(model, ids, mask, args, seed: int) -> torch.Tensor:
    from model_defs.generate import generate

    gen = torch.Generator(device=ids.device).manual_seed(seed)
    return generate(model, ids, attention_mask=mask, max_new_tokens=args.new_tokens, temperature=args.temperature,
                    top_p=args.top_p, generator=gen)[:, ids.shape[1]:]


def run_theirs(model, ids, mask, args, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    sampled = args.temperature > 0
    if sampled:
        kwargs = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p or 1.0, "top_k": 0}
    else:
        kwargs = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                             min_new_tokens=args.new_tokens, eos_token_id=None, pad_token_id=0, use_cache=True,
                             **kwargs)
    return out[:, ids.shape[1]:]


def timed(fn, device: torch.device) -> tuple[torch.Tensor, float, float]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        cfg, ours, theirs = build(args, Path(tmp) / "model", device, dtype)
    ids, mask = prompts(args, cfg.vocab_size, device)
    runners = {"ours": lambda: run_ours(ours, ids, mask, args, 0),
               "transformers": lambda: run_theirs(theirs, ids, mask, args, 0)}
    for name, fn in runners.items():  # warm-up: allocator, kernels, lazy imports
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - any failure of a contender fails the bench, with its reason
            print(f"contender '{name}' failed: {type(err).__name__}: {err}", file=sys.stderr)
            return 1
    tokens = args.batch * args.new_tokens
    rates = {n: {"wall": [], "cpu": []} for n in CONTENDERS}
    outputs = {}
    with LoadSampler() as load:
        for r in range(args.rounds):
            order = CONTENDERS if r % 2 == 0 else CONTENDERS[::-1]
            for name in order:
                out, wall, cpu = timed(runners[name], device)
                if out.shape != (args.batch, args.new_tokens):
                    print(f"contender '{name}' generated {tuple(out.shape)}, expected "
                          f"{(args.batch, args.new_tokens)}", file=sys.stderr)
                    return 1
                outputs[name] = out
                rates[name]["wall"].append(tokens / wall)
                rates[name]["cpu"].append(tokens / max(cpu, 1e-9))
    ratio = {clock: [o / t for o, t in zip(rates["ours"][clock], rates["transformers"][clock])]
             for clock in ("wall", "cpu")}
    same_rows = (outputs["ours"].cpu() == outputs["transformers"].cpu()).all(dim=1).float().mean().item()
    result = {"settings": {k: v for k, v in vars(args).items() if k != "json"}, "device": str(device),
              "dtype": str(dtype), "threads": torch.get_num_threads(), "tokens_per_call": tokens,
              "tokens_per_s": {n: {c: spread(v) for c, v in rates[n].items()} for n in CONTENDERS},
              "ratio_ours_over_transformers": {c: spread(v) for c, v in ratio.items()},
              "greedy_rows_equal": same_rows if args.temperature == 0 else None, "load": load.summary()}
    print(f"generation, preset {args.preset}, batch {args.batch}, prompts <= {args.prompt_len}, "
          f"{args.new_tokens} new tokens, {device} {str(dtype).removeprefix('torch.')}, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds")
    for n in CONTENDERS:
        print(f"  {n:13s} tokens/s wall {fmt_spread(spread(rates[n]['wall']))}   "
              f"cpu {fmt_spread(spread(rates[n]['cpu']))}")
    print(f"  ours / transformers: wall {fmt_spread(spread(ratio['wall']), digits=2, suffix='x')}   "
          f"cpu {fmt_spread(spread(ratio['cpu']), digits=2, suffix='x')}")
    if args.temperature == 0:
        print(f"  greedy rows equal: {same_rows:.0%}")
    s = load.summary()
    print(f"  load: 1-min average median {s['load1_median']:.1f}, max {s['load1_max']:.1f} on {s['cpus']} CPUs")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
