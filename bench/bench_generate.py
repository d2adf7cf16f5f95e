"""Batched generation throughput: our KV-cache `generate` vs transformers' `generate` on the same model.

One model, two runtimes: a random-weight model of `--preset` shape is built with our code, saved as an
HF Llama folder, and loaded by transformers (`LlamaForCausalLM`, its default dynamic cache) and by us
(`load_hf_model`), so both hold the same weights in the same dtype. Both continue the same left-padded
batch of prompts (lengths drawn between `--prompt-len`/2 and `--prompt-len`) by exactly `--new-tokens`
tokens (no stop token: transformers gets `min_new_tokens` and no EOS, ours no stop ids), greedy by
default or sampled with `--temperature/--top-p`. Greedy outputs are compared token for token (the share
of equal rows is reported; fp32 near-ties may split a row).

Three contenders: `ours` (the default path, `FusedDecoder`), `ours-module` (the same loop through the
model's modules and `KVCache`, `fused=False`) and `transformers`, in one process (same threads, same
allocator) on `bench/common.py`'s rounds driver, which alternates their order between rounds; each
round times one `generate` call per contender, after one warm-up call in its first round. Figures:
generated tokens/s on wall time and on process CPU time (which other processes' load does not inflate),
median [min-max] over rounds, the per-round ratios over transformers, greedy rows equal to transformers'
and whether `ours` equals `ours-module`, the CPU time to build the decoding state of one call (part of
`ours`' every call, shown apart) and the 1-minute load. A contender that fails fails the bench (non-zero
exit). `--json PATH` writes every figure.

    python bench/bench_generate.py --threads 1 --rounds 3 --batch 8 --prompt-len 64 --new-tokens 64
    python bench/bench_generate.py --device cuda --preset 125m --batch 32 --prompt-len 256 --new-tokens 128
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch

from bench.common import (
    add_round_args,
    contender_spreads,
    finish,
    fmt_spread,
    load_summary,
    round_ratio,
    run_rounds,
    write_json,
)

# ours-module: the same generate loop through the training model's modules and KVCache (fused=False), so
# the figures separate what FusedDecoder gains from what the loop itself does.
CONTENDERS = ("ours", "ours-module", "transformers")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="debug", help="model_defs preset for the model's shape")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    add_round_args(p)
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


def run_ours(model, ids, mask, args, seed: int, fused: bool | None = None) -> torch.Tensor:
    from model_defs.generate import generate

    gen = torch.Generator(device=ids.device).manual_seed(seed)
    return generate(model, ids, attention_mask=mask, max_new_tokens=args.new_tokens, temperature=args.temperature,
                    top_p=args.top_p, generator=gen, fused=fused)[:, ids.shape[1]:]


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


def setup_seconds(model, ids, mask, args, pack: bool) -> float:
    """CPU seconds to build the decoding state of one call (fused weights, cache; packed weights with `pack`):
    part of every call of ours, so already inside its tokens/s, shown apart to size what packing costs."""
    from model_defs.decode import FusedDecoder

    times = []
    for _ in range(3):
        start = time.process_time()
        FusedDecoder(model, mask.bool(), ids.shape[1] + args.new_tokens, pack=pack)
        times.append(time.process_time() - start)
    return min(times)


def prepare(args: argparse.Namespace):
    """The model both sides load, the prompts and one generate call per side, from the bench's flags
    (bench/profile_generate.py profiles the same calls)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        cfg, ours, theirs = build(args, Path(tmp) / "model", device, dtype)
    ids, mask = prompts(args, cfg.vocab_size, device)
    runners = {"ours": lambda: run_ours(ours, ids, mask, args, 0),
               "ours-module": lambda: run_ours(ours, ids, mask, args, 0, fused=False),
               "transformers": lambda: run_theirs(theirs, ids, mask, args, 0)}
    return device, dtype, ours, ids, mask, runners


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype, ours, ids, mask, runners = prepare(args)
    tokens = args.batch * args.new_tokens
    warmed: set[str] = set()

    def spawn(name: str) -> dict:
        try:
            if name not in warmed:  # warm-up: allocator, kernels, lazy imports
                runners[name]()
                warmed.add(name)
            out, wall, cpu = timed(runners[name], device)
        except Exception as err:  # noqa: BLE001 - any failure of a contender fails the bench, with its reason
            raise RuntimeError(f"{type(err).__name__}: {err}") from None
        if out.shape != (args.batch, args.new_tokens):
            raise RuntimeError(f"generated {tuple(out.shape)}, expected {(args.batch, args.new_tokens)}")
        return {"wall": tokens / wall, "cpu": tokens / max(cpu, 1e-9), "out": out.cpu()}

    per_round, failed = run_rounds(CONTENDERS, spawn, args.rounds,
                                   describe=lambda r: f"{r['wall']:.0f} tok/s wall, {r['cpu']:.0f} cpu")
    if failed:
        finish(failed)
    spreads = contender_spreads(per_round, {"wall": lambda r: r["wall"], "cpu": lambda r: r["cpu"]})
    ratio = {name: {clock: round_ratio(per_round, name, "transformers", lambda r, c=clock: r[c])
                    for clock in ("wall", "cpu")} for name in ("ours", "ours-module")}
    last = per_round[-1]
    same_rows = {name: (last[name]["out"] == last["transformers"]["out"]).all(dim=1).float().mean().item()
                 for name in ("ours", "ours-module")}
    fused_same = torch.equal(last["ours"]["out"], last["ours-module"]["out"])
    setup = None
    if ours.output.weight.device.type == "cpu":
        from model_defs.decode import mkl_packing_available

        setup = {"fused": setup_seconds(ours, ids, mask, args, pack=False)}
        if mkl_packing_available(ours.output.weight):
            setup["fused_packed"] = setup_seconds(ours, ids, mask, args, pack=True)
    load = load_summary(per_round)
    greedy = args.temperature == 0
    result = {"settings": {k: v for k, v in vars(args).items() if k != "json"}, "device": str(device),
              "dtype": str(dtype), "threads": torch.get_num_threads(), "tokens_per_call": tokens,
              "tokens_per_s": spreads, "ratio_over_transformers": ratio,
              "greedy_rows_equal": same_rows if greedy else None,
              "ours_equals_module_path": fused_same if greedy else None, "setup_cpu_s": setup,
              "per_round": [{n: {"wall": r[n]["wall"], "cpu": r[n]["cpu"], "load": r[n]["load"]} for n in r}
                            for r in per_round],
              "load": load}
    print(f"generation, preset {args.preset}, batch {args.batch}, prompts <= {args.prompt_len}, "
          f"{args.new_tokens} new tokens, {device} {str(dtype).removeprefix('torch.')}, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds")
    for n in CONTENDERS:
        print(f"  {n:13s} tokens/s wall {fmt_spread(spreads[n]['wall'])}   cpu {fmt_spread(spreads[n]['cpu'])}")
    for n in ("ours", "ours-module"):
        print(f"  {n} / transformers: wall {fmt_spread(ratio[n]['wall'], digits=2, suffix='x')}   "
              f"cpu {fmt_spread(ratio[n]['cpu'], digits=2, suffix='x')}")
    if greedy:
        print(f"  greedy rows equal to transformers: ours {same_rows['ours']:.0%}, "
              f"ours-module {same_rows['ours-module']:.0%}; ours == ours-module: {fused_same}")
    if setup:
        print("  decoding state per call (inside the figures above): "
              + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in setup.items()))
    print(f"  load: 1-min average median {load['load1']['median']:.1f}, max {load['load1_max']:.1f} "
          f"on {load['cpus']} CPUs")
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
