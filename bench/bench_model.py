"""Training-step throughput of model_defs.Transformer vs transformers' LlamaForCausalLM.

Both models get the same shapes and the same weights (ours is converted from the HF one), run
forward + cross-entropy + backward in the same process, with steps interleaved so background
load hits both alike, in `--rounds` rounds that alternate which model steps first. Warmup steps
are not timed. Reported per model: the median [min-max] over rounds of each round's median step
time, tokens/s, MFU (flops_per_token: 6N + 12*L*H*Q*T) and peak memory (GPU), the ours/HF ratio
taken within each round, and the machine's load during each round.

    python bench/bench_model.py                       # debug preset, CPU, fp32 + bf16 autocast
    python bench/bench_model.py --threads 1 --timer cpu   # a fair ratio on a busy shared machine
    python bench/bench_model.py --device cuda --preset llama3.2-1b --batch-size 4 --seq-len 2048
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from rich.console import Console
from rich.table import Table
from transformers import LlamaForCausalLM

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import (  # noqa: E402
    LoadSampler,
    add_round_args,
    contender_spreads,
    fmt_spread,
    load_summary,
    round_ratio,
    write_json,
)
from model_defs import ModelConfig, Transformer, flops_per_token  # noqa: E402
from model_defs.hf import config_to_hf, state_dict_from_hf  # noqa: E402

# Default CPU peak per core: 2.6 GHz x 64 fp32 FLOP/cycle (two 512-bit FMA units) = 166 GFLOP/s,
# doubled for bf16 (AVX512-BF16 dot products). Pass --cpu-peak-tflops for another CPU.
CPU_PEAK_GFLOPS_PER_CORE = {"fp32": 166.4, "bf16": 332.8}
# Dense bf16 peaks of common GPUs, TFLOP/s; fp32 mode (TF32 matmuls) is taken as half of it.
GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0, "T4": 65.0}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="debug", help="model_defs preset giving the shape (default: debug)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model and mode")
    p.add_argument("--steps", type=int, default=8, help="timed steps per model and mode")
    p.add_argument("--vocab-size", type=int, default=None, help="override the preset's vocabulary")
    add_round_args(p)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--modes", default=None,
                   help="comma list of fp32,bf16 (bf16 = autocast); default fp32,bf16 on CPU, bf16 on GPU")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--timer", choices=("wall", "cpu"), default="wall",
                   help="wall clock (default), or this process's CPU time: with --threads 1 on a shared "
                        "machine, cpu time is not inflated by other processes' load")
    p.add_argument("--cpu-peak-tflops", type=float, default=None,
                   help="CPU peak for MFU, all modes; default per core x torch threads: "
                        f"{CPU_PEAK_GFLOPS_PER_CORE['fp32']:.0f} GFLOP/s fp32, "
                        f"{CPU_PEAK_GFLOPS_PER_CORE['bf16']:.0f} GFLOP/s bf16")
    p.add_argument("--gpu-peak-tflops", type=float, default=None,
                   help="GPU peak for MFU; default from the device name (H100 989, A100 312, ...)")
    return p.parse_args()


def peak_flops(args: argparse.Namespace, device: torch.device, mode: str) -> float:
    if device.type == "cpu":
        if args.cpu_peak_tflops:
            return args.cpu_peak_tflops * 1e12
        return CPU_PEAK_GFLOPS_PER_CORE[mode] * torch.get_num_threads() * 1e9
    if args.gpu_peak_tflops:
        return args.gpu_peak_tflops * 1e12
    name = torch.cuda.get_device_name(device)
    for key, tflops in GPU_PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12 * (0.5 if mode == "fp32" else 1.0)
    raise SystemExit(f"unknown GPU {name!r}: pass --gpu-peak-tflops")


def build_pair(cfg: ModelConfig, device: torch.device) -> tuple[Transformer, LlamaForCausalLM]:
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(**config_to_hf(cfg), attn_implementation="sdpa")
    hf = LlamaForCausalLM(hf_config).to(device).train()
    ours = Transformer(cfg).to(device).train()
    ours.load_state_dict(state_dict_from_hf(hf.state_dict(), cfg))
    return ours, hf


def make_step(
    forward: Callable[[torch.Tensor], torch.Tensor], model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
    autocast: contextlib.AbstractContextManager,
) -> Callable[[], float]:
    def step() -> float:
        model.zero_grad(set_to_none=True)
        with autocast:
            logits = forward(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        return loss.item()  # also synchronizes, so the timer sees the whole step

    return step


def run_mode(mode: str, cfg: ModelConfig, args: argparse.Namespace, device: torch.device) -> tuple[dict, list[dict]]:
    """First-step losses, and per round each model's median step time and peak memory (GPU) with the load."""
    ours, hf = build_pair(cfg, device)
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len + 1), generator=g).to(device)
    x, y = data[:, :-1], data[:, 1:]
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if mode == "bf16" else contextlib.nullcontext())
    steps = {
        "ours": make_step(lambda t: ours(t), ours, x, y, autocast),
        "hf": make_step(lambda t: hf(input_ids=t, use_cache=False).logits, hf, x, y, autocast),
    }
    losses = {name: step() for name, step in steps.items()}  # first warmup step; also a parity check
    for _ in range(args.warmup - 1):
        for step in steps.values():
            step()
    clock = time.process_time if args.timer == "cpu" else time.perf_counter
    rounds = []
    for index in range(args.rounds):
        order = list(steps) if index % 2 == 0 else list(steps)[::-1]
        times: dict[str, list[float]] = {name: [] for name in steps}
        peaks: dict[str, float] = {name: 0.0 for name in steps}
        with LoadSampler() as load:
            for _ in range(args.steps):
                for name in order:  # interleaved: background load affects both alike
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    t0 = clock()
                    steps[name]()
                    times[name].append(clock() - t0)
                    if device.type == "cuda":
                        peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated(device) / 2**30)
        rounds.append({name: {"step_s": statistics.median(ts), "peak_gb": peaks[name] if device.type == "cuda" else None,
                              "load": load.summary()} for name, ts in times.items()})
        print(f"{mode} round {index + 1}: " + ", ".join(f"{n} {1000 * r['step_s']:.1f} ms" for n, r in rounds[-1].items())
              + f", load {rounds[-1]['ours']['load']['load1_median']:.2f}", flush=True)
    return losses, rounds


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    device = torch.device(args.device)
    modes = (args.modes or ("fp32,bf16" if device.type == "cpu" else "bf16")).split(",")
    cfg = ModelConfig.from_preset(args.preset, max_seq_len=max(args.seq_len, 1), attention="sdpa",
                                  **({"vocab_size": args.vocab_size} if args.vocab_size else {}))
    tokens = args.batch_size * args.seq_len
    fpt = flops_per_token(cfg, args.seq_len)
    if args.timer == "cpu" and device.type != "cpu":
        raise SystemExit("--timer cpu measures host CPU time; use it with --device cpu")

    console = Console(width=max(Console().width, 150))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    console.print(f"preset={args.preset} dim={cfg.dim} layers={cfg.n_layers} heads={cfg.n_heads}/{cfg.n_kv_heads} "
                  f"vocab={cfg.vocab_size} | batch={args.batch_size} seq={args.seq_len} | device={where} "
                  f"timer={args.timer} | warmup={args.warmup} steps={args.steps} rounds={args.rounds} | "
                  f"torch {torch.__version__}, transformers {transformers.__version__}")
    table = Table(title="forward+backward throughput, median \\[min-max] over rounds of each round's median step")
    for col in ("mode", "model", "step ms", "tokens/s", "peak TFLOP/s", "MFU %", "peak GB", "ours/HF tokens/s",
                "load (1 min)", "first loss"):
        table.add_column(col, justify="right")
    payload = {"bench": "model", "args": vars(args), "device": where, "flops_per_token": fpt, "modes": {}}
    for mode in modes:
        losses, rounds = run_mode(mode, cfg, args, device)
        peak = peak_flops(args, device, mode)
        figures = {"step_s": lambda r: r["step_s"], "tokens_per_s": lambda r: tokens / r["step_s"],
                   "mfu": lambda r: tokens / r["step_s"] * fpt / peak}
        if device.type == "cuda":
            figures["peak_gb"] = lambda r: r["peak_gb"]
        per = contender_spreads(rounds, figures)
        ratio = round_ratio(rounds, "hf", "ours", lambda r: r["step_s"])
        for name, label in (("ours", "model_defs"), ("hf", "HF Llama")):
            s = per[name]
            table.add_row(mode, label, fmt_spread(s["step_s"], 1000), fmt_spread(s["tokens_per_s"], digits=0),
                          f"{peak / 1e12:.3f}", fmt_spread(s["mfu"], 100, 2),
                          fmt_spread(s["peak_gb"], digits=2) if "peak_gb" in s else "-",
                          fmt_spread(ratio, digits=2, suffix="x") if name == "ours" else "1.00x",
                          fmt_spread(s["load1"], digits=2), f"{losses[name]:.4f}")
        payload["modes"][mode] = {"peak_tflops": peak / 1e12, "contenders": per, "ratio_ours_over_hf": ratio,
                                  "first_loss": losses, "load": load_summary(rounds), "rounds": rounds}
    console.print(table)
    if args.json:
        write_json(args.json, payload)


if __name__ == "__main__":
    main()
