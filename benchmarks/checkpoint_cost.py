"""What checkpointing costs: the same training with training.save_steps=auto (the default: every
ceil(10%) of the steps, each save verified and marked) and with training.save_steps=0 (none),
measured side by side in one run, alternating, each `--repeats` times.

    python benchmarks/checkpoint_cost.py                                   # smoke model, 20 steps
    python benchmarks/checkpoint_cost.py experiment=tweets training.max_steps=20
    python benchmarks/checkpoint_cost.py --repeats 3 training.save_steps=5

Overrides after the options go to every run (a training.save_steps among them replaces `auto`).
Reported: the Trainer's train_runtime (the training loop, saves included) and the command's wall
time, and each one's ratio to no checkpointing. Everything goes to a temporary folder.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tunelab(tmp: Path, run_dir: Path, overrides: list) -> float:
    cmd = [sys.executable, "-m", "tunelab", *overrides, f"paths.run_dir={run_dir}",
           f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"tracking.artifact_location={tmp}/artifacts",
           "cache.enabled=false"]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def measure(tmp: Path, prepared: Path, label: str, overrides: list) -> dict:
    run_dir = tmp / label
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(prepared, run_dir)  # prepare once; the checkpoints of an earlier repeat are gone
    wall = tunelab(tmp, run_dir, [*overrides, "stage=train", "training.resume=never"])
    summary = json.loads((run_dir / "train/summary.json").read_text())
    saved = sorted((run_dir / "checkpoints").glob("checkpoint-*/tunelab-checkpoint.json"))
    print(f"  {label:<10} train {summary['train_runtime_s']:7.2f} s  wall {wall:6.1f} s  "
          f"({summary['steps']} steps, {len(saved)} checkpoints kept)", file=sys.stderr, flush=True)
    return {"train": summary["train_runtime_s"], "wall": wall, "steps": summary["steps"]}


def main(argv: list) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    args, overrides = parser.parse_known_args(argv)
    overrides = overrides or ["experiment=smoke", "training.max_steps=20"]
    if not any(o.startswith("experiment=") for o in overrides):
        overrides = ["experiment=smoke", *overrides]
    saving = [o for o in overrides if o.startswith("training.save_steps=")] or ["training.save_steps=auto"]
    common = [o for o in overrides if not o.startswith("training.save_steps=")]
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        print(f"prepare ({' '.join(common)})", file=sys.stderr, flush=True)
        tunelab(tmp, tmp / "prepared", [*common, "stage=prepare"])
        results = {"with": [], "without": []}
        for repeat in range(args.repeats):  # alternating: a slower moment of a shared machine hits both
            print(f"repeat {repeat + 1} of {args.repeats}", file=sys.stderr, flush=True)
            results["with"].append(measure(tmp, tmp / "prepared", "with", [*common, *saving]))
            results["without"].append(measure(tmp, tmp / "prepared", "without", [*common, "training.save_steps=0"]))
    report(results, " ".join(common), saving[0])


def report(results: dict, setup: str, saving: str) -> None:
    base = {key: statistics.median(r[key] for r in results["without"]) for key in ("train", "wall")}
    print(f"\ncheckpoint cost: {setup}, {results['with'][0]['steps']} steps, median of {len(results['with'])}")
    print(f"| {'checkpointing':<28} | train loop s | ratio | command wall s | ratio |")
    print(f"|{'-' * 30}|-------------:|------:|---------------:|------:|")
    for label, runs in (("with (" + saving + ")", results["with"]), ("without (training.save_steps=0)",
                                                                      results["without"])):
        train, wall = (statistics.median(r[key] for r in runs) for key in ("train", "wall"))
        print(f"| {label:<28} | {train:12.2f} | {train / base['train']:5.2f} | {wall:14.1f} | "
              f"{wall / base['wall']:5.2f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
