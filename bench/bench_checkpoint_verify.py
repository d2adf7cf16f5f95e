"""What checking a checkpoint's manifest costs next to loading it (docs/checkpoints.md#integrity-the-manifest).

    python bench/bench_checkpoint_verify.py [--gb 1.0] [--rounds 3] [--workdir DIR] [--json OUT]

Writes a checkpoint-shaped folder of about `--gb` GB (fp32 weights, AdamW's two moments, as a
plain checkpoint holds them), its manifest, then alternates in rounds: verify (sizes + xxh3-64 of
every file, trainer.checkpoint.verify_checkpoint) and load (every tensor file read into memory
with safetensors, as a resume does). Both read the files from the page cache after the first
round; a cold read from disk costs both the same extra. Prints the median [min-max] of each, of
their ratio per round, and the machine's load.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import LoadSampler, fmt_spread, spread, work_folder
from trainer.checkpoint import verify_checkpoint, write_manifest

FILES = ("model.safetensors", "exp_avg.safetensors", "exp_avg_sq.safetensors")


def make_checkpoint(folder: Path, gigabytes: float) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    per_file = int(gigabytes * 1e9 / len(FILES) / 4)  # fp32 elements
    rows = 4096
    gen = torch.Generator().manual_seed(0)
    for name in FILES:
        save_file({"weight": torch.randn(rows, per_file // rows, generator=gen)}, str(folder / name))
    write_manifest(folder)
    return sum((folder / name).stat().st_size for name in FILES)


def load_all(folder: Path) -> int:
    # safetensors maps the file lazily; copying every tensor out is what loading into a model costs.
    return sum(t.clone().numel() for name in FILES for t in load_file(str(folder / name)).values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.rounds < 3:
        parser.error("--rounds must be at least 3")
    root, tmp = work_folder(args.workdir, "bench-verify-")
    try:
        folder = root / "step_00000001"
        size = make_checkpoint(folder, args.gb)
        load_all(folder)  # warm the page cache for both contenders alike
        verify_s, load_s = [], []
        with LoadSampler() as load:
            for _ in range(args.rounds):
                start = time.perf_counter()
                report = verify_checkpoint(folder)
                verify_s.append(time.perf_counter() - start)
                if not report.has_manifest or report.bytes < size:
                    raise RuntimeError(f"verification did not cover the checkpoint: {report}")
                start = time.perf_counter()
                load_all(folder)
                load_s.append(time.perf_counter() - start)
        ratio = [v / w for v, w in zip(verify_s, load_s)]
        result = {"bytes": size, "verify_s": spread(verify_s), "load_s": spread(load_s),
                  "verify_over_load": spread(ratio), "load": load.summary()}
        print(f"checkpoint {size / 1e9:.2f} GB in {len(FILES)} files + manifest, {args.rounds} rounds")
        print(f"verify  {fmt_spread(result['verify_s'], digits=2, suffix=' s')}  "
              f"({size / 1e9 / result['verify_s']['median']:.2f} GB/s)")
        print(f"load    {fmt_spread(result['load_s'], digits=2, suffix=' s')}")
        print(f"verify / load  {fmt_spread(result['verify_over_load'], digits=2)}")
        print(f"load average {result['load']['load1_median']:.1f} (max {result['load']['load1_max']:.1f}) "
              f"on {result['load']['cpus']} CPUs")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
