"""The GPU check: the `gpu`-marked tests and the model / pretraining / SFT / DPO benches at a real shape in one
short window, gathered into one JSON of tokens/s, MFU and peak memory, ours beside the peers'.

Run through `bench/gpu_check.sh` (which first installs what is missing from carried wheels). On a GPU the
benches run the `llama3.2-1b` preset at seq 2048 in bf16; `--dry-run` runs the same stages, the same bench
code and writes the same JSON schema at tiny shapes on the CPU, so CI keeps the script from rotting.

Every stage runs in its own process with a time limit cut to what is left of `--budget-s`, writes its log
(and its bench JSON) into `--out`, and is recorded as ok / failed / timeout / skipped; a stage that is not ok
makes the check exit non-zero, after `gpu_check.json` is written.

    bash bench/gpu_check.sh --out runs/gpu-check                  # on a GPU (about 7 minutes on an H100/H200)
    bash bench/gpu_check.sh --dry-run --out /tmp/gpu-check-dry      # CPU, tiny shapes
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import write_json

STAGES = ("tests", "model", "pretrain", "sft", "dpo")
# Published MFU of 1B-class pretraining for comparison (bf16): llm-foundry's table for a 1B model on H100
# (its benchmarking README), TinyLlama 1.1B on A100 (the TinyLlama paper / README).
PUBLISHED_MFU = {"llm-foundry 1B, H100": 0.418, "TinyLlama 1.1B, A100": 0.56}
MFU_GOAL = 0.5
# Modules the stages import, and the optional GPU ones the tests use when present.
REQUIRED = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "deepspeed")
OPTIONAL = ("flash_attn", "bitsandbytes", "liger_kernel")


@dataclass
class Stage:
    name: str
    cmd: list[str]
    limit_s: float
    json_name: str | None = None
    env: dict[str, str] = field(default_factory=dict)


def gpu_test_files() -> list[str]:
    """Test files holding a `gpu`-marked test: running only these keeps collection short."""
    return sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "tests").glob("test_*.py")
                  if "pytest.mark.gpu" in p.read_text())


def stages(dry_run: bool, out: Path, rounds: int) -> list[Stage]:
    py = sys.executable
    bench = lambda name: str(REPO_ROOT / "bench" / f"bench_{name}.py")
    js = lambda name: ["--json", str(out / f"{name}.json")]
    tests = Stage("tests", [py, "-m", "pytest", "-q", "-rs", "-m", "gpu", "-p", "no:cacheprovider",
                            f"--junitxml={out / 'tests.xml'}", *gpu_test_files()], 120)
    if dry_run:
        cpu = ["--threads", "1"]
        return [
            tests,
            Stage("model", [py, bench("model"), "--device", "cpu", "--preset", "tiny", "--batch-size", "2",
                            "--seq-len", "32", "--modes", "bf16", "--warmup", "1", "--steps", "2",
                            "--rounds", str(rounds), *cpu, *js("model")], 600, "model.json"),
            Stage("pretrain", [py, bench("pretrain"), "--preset", "tiny", "--seq-len", "32", "--batch-size", "2",
                               "--steps", "4", "--warmup", "1", "--precision", "bf16", "--documents", "300",
                               "--only", "ours", "hf", "--rounds", str(rounds), *cpu, *js("pretrain")], 600,
                  "pretrain.json", {"CUDA_VISIBLE_DEVICES": ""}),
            Stage("sft", [py, bench("sft"), "--device", "cpu", "--preset", "tiny", "--vocab-size", "512",
                          "--seq-len", "64", "--batch-size", "2", "--steps", "4", "--warmup", "1", "--precision",
                          "fp32", "--only", "ours_packed", "trl_packed", "--rounds", str(rounds), *cpu,
                          *js("sft")], 600, "sft.json", {"CUDA_VISIBLE_DEVICES": ""}),
            Stage("dpo", [py, bench("dpo"), "--device", "cpu", "--preset", "tiny", "--vocab-size", "512",
                          "--seq-len", "64", "--max-prompt-len", "32", "--batch-pairs", "2", "--warmup", "2",
                          "--steps", "2", "--precision", "fp32", "--runs", "adapter,trl", "--rounds", str(rounds),
                          *cpu, *js("dpo")], 600, "dpo.json"),
        ]
    # The real shape: Llama-3.2-1B (with its 128K vocabulary where the bench builds its own model), seq 2048,
    # bf16. Steps are few: a 1B step is a fraction of a second here, most of each run is start-up.
    return [
        tests,
        Stage("model", [py, bench("model"), "--device", "cuda", "--preset", "llama3.2-1b", "--batch-size", "4",
                        "--seq-len", "2048", "--modes", "bf16", "--warmup", "2", "--steps", "5",
                        "--rounds", str(max(rounds, 3)), *js("model")], 120, "model.json"),
        Stage("pretrain", [py, bench("pretrain"), "--preset", "llama3.2-1b", "--vocab-size", "128256",
                           "--seq-len", "2048", "--batch-size", "4", "--steps", "12", "--warmup", "4",
                           "--precision", "bf16", "--only", "ours", "hf", "--rounds", str(rounds),
                           *js("pretrain")], 150, "pretrain.json"),
        Stage("sft", [py, bench("sft"), "--device", "cuda", "--preset", "llama3.2-1b", "--seq-len", "2048",
                      "--batch-size", "8", "--steps", "10", "--warmup", "3", "--precision", "bf16",
                      "--only", "ours_packed", "trl_packed", "--rounds", str(rounds), *js("sft")], 120, "sft.json"),
        Stage("dpo", [py, bench("dpo"), "--device", "cuda", "--preset", "llama3.2-1b", "--seq-len", "2048",
                      "--max-prompt-len", "1024", "--batch-pairs", "8", "--warmup", "2", "--steps", "6",
                      "--precision", "bf16", "--runs", "adapter,trl", "--rounds", str(rounds), *js("dpo")], 120,
              "dpo.json"),
    ]


def environment() -> dict:
    """Versions of what the stages import (None: missing), and the device."""
    versions = {}
    for name in REQUIRED + OPTIONAL:
        if importlib.util.find_spec(name) is None:
            versions[name] = None
            continue
        try:
            versions[name] = getattr(__import__(name), "__version__", "unknown")
        except Exception as err:  # noqa: BLE001 - a broken install (e.g. a wheel built for another CUDA) is reported, not fatal
            versions[name] = f"import failed: {type(err).__name__}: {str(err)[:200]}"
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    return {"device": device, "python": platform.python_version(), "versions": versions,
            "cuda": torch.version.cuda if torch.cuda.is_available() else None}


def run_stage(stage: Stage, out: Path, limit_s: float) -> dict:
    log = out / f"{stage.name}.log"
    start = time.monotonic()
    with open(log, "w") as f:
        f.write("$ " + " ".join(stage.cmd) + "\n")
        f.flush()
        # Its own process group, so a timeout also ends the workers a bench started.
        proc = subprocess.Popen(stage.cmd, cwd=REPO_ROOT, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **stage.env}, start_new_session=True)
        try:
            rc = proc.wait(timeout=limit_s)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            rc, status = None, "timeout"
    return {"status": status, "returncode": rc, "seconds": round(time.monotonic() - start, 1),
            "limit_s": round(limit_s, 1), "log": log.name, "command": stage.cmd}


def medians(contenders: dict) -> dict:
    """{contender: {figure: median}} from a bench's spreads."""
    return {name: {key: s["median"] for key, s in figures.items() if isinstance(s, dict) and "median" in s}
            for name, figures in contenders.items()}


def figures_of(name: str, payload: dict) -> dict:
    """The comparable figures of one bench's JSON: per contender medians, the ratios, the load."""
    if name == "model":
        return {mode: {"contenders": medians(m["contenders"]), "ratio_ours_over_hf": m["ratio_ours_over_hf"],
                       "load": m["load"]} for mode, m in payload["modes"].items()}
    ratios = payload.get("ratios_over_hf", payload.get("ratios"))
    return {"contenders": medians(payload["contenders"]), "ratios": ratios, "load": payload["load"]}


def test_counts(xml_path: Path) -> dict | None:
    if not xml_path.is_file():
        return None
    root = ET.parse(xml_path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    total, failures, errors, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    return {"tests": total, "passed": total - failures - errors - skipped, "failed": failures + errors,
            "skipped": skipped}


def goals(figures: dict) -> dict:
    pretrain = figures.get("pretrain", {}).get("contenders", {}).get("ours", {})
    mfu = pretrain.get("mfu")
    return {"pretrain_mfu": {"goal": MFU_GOAL, "ours": mfu, "met": None if mfu is None else mfu >= MFU_GOAL,
                             "published": PUBLISHED_MFU}}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, same stages and JSON")
    p.add_argument("--out", required=True, help="a new (or empty) folder for gpu_check.json, logs and bench JSONs")
    p.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget for all stages (default 7.5 min)")
    p.add_argument("--rounds", type=int, default=None,
                   help="alternating rounds of the process benches (default: 2 on a GPU, 1 in a dry run; the "
                        "in-process model bench runs at least 3 on a GPU)")
    p.add_argument("--stages", nargs="*", choices=STAGES, default=list(STAGES))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        sys.exit(f"error: {out} exists and is not an empty folder; give a new --out")
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("error: no CUDA device visible; run with --dry-run on a CPU")
    out.mkdir(parents=True, exist_ok=True)
    rounds = args.rounds or (1 if args.dry_run else 2)
    env = environment()
    missing = [m for m in REQUIRED if env["versions"][m] is None]
    report = {"mode": "dry-run" if args.dry_run else "gpu", "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "environment": env, "budget_s": args.budget_s, "stages": {}, "figures": {}}
    deadline = time.monotonic() + args.budget_s
    for stage in stages(args.dry_run, out, rounds):
        if stage.name not in args.stages:
            continue
        left = deadline - time.monotonic()
        if missing:
            report["stages"][stage.name] = {"status": "skipped", "reason": f"missing {', '.join(missing)}"}
        elif left < 20:
            report["stages"][stage.name] = {"status": "skipped", "reason": "out of budget"}
        else:
            result = run_stage(stage, out, min(stage.limit_s, left))
            report["stages"][stage.name] = result
            if stage.json_name and (out / stage.json_name).is_file():
                report["figures"][stage.name] = figures_of(stage.name, json.loads((out / stage.json_name).read_text()))
            if stage.name == "tests":
                report["figures"]["tests"] = test_counts(out / "tests.xml")
        print(f"{stage.name}: {json.dumps({k: v for k, v in report['stages'][stage.name].items() if k != 'command'})}",
              flush=True)
    report["goals"] = goals(report["figures"])
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_json(out / "gpu_check.json", report)
    bad = [name for name, s in report["stages"].items() if s["status"] != "ok"]
    print(f"wrote {out / 'gpu_check.json'}" + (f"; not ok: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
