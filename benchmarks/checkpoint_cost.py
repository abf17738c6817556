"""What checkpointing costs: the same training with training.save_steps=auto (the default: every
ceil(10%) of the steps, each save verified and marked) and with training.save_steps=0 (none),
measured side by side in one run, alternating, each `--repeats` times.

    python benchmarks/checkpoint_cost.py                                   # smoke model, 20 steps
    python benchmarks/checkpoint_cost.py experiment=tweets training.max_steps=20
    python benchmarks/checkpoint_cost.py --repeats 3 training.save_steps=5

Overrides after the options go to every run (a training.save_steps among them replaces `auto`).
Reported: the Trainer's train_runtime (the training loop, saves included) and the command's wall
time, the fastest of the repeats (a shared machine only ever adds time) and each one's ratio to no
checkpointing; and, measured inside the run, what one save costs (from the step's end to the
marker: the Trainer's save plus tunelab's verification) against one step. Everything goes to a
temporary folder.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tunelab(tmp: Path, run_dir: Path, overrides: list):
    cmd = [sys.executable, "-m", "tunelab", *overrides, f"paths.run_dir={run_dir}",
           f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"tracking.artifact_location={tmp}/artifacts",
           "cache.enabled=false"]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return time.perf_counter() - start, done.stderr


def measure(tmp: Path, prepared: Path, label: str, overrides: list) -> dict:
    run_dir = tmp / label
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(prepared, run_dir)  # prepare once; the checkpoints of an earlier repeat are gone
    wall, stderr = tunelab(tmp, run_dir, [*overrides, "stage=train", "training.resume=never"])
    summary = json.loads((run_dir / "train/summary.json").read_text())
    saves = [float(s) for s in re.findall(r"saved and verified in ([0-9.]+) s", stderr)]
    print(f"  {label:<10} train {summary['train_runtime_s']:7.2f} s  wall {wall:6.1f} s  "
          f"({summary['steps']} steps, {len(saves)} saves"
          + (f", median save {statistics.median(saves):.3f} s)" if saves else ")"), file=sys.stderr, flush=True)
    return {"train": summary["train_runtime_s"], "wall": wall, "steps": summary["steps"], "saves": saves}


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
    best = {side: {key: min(r[key] for r in runs) for key in ("train", "wall")} for side, runs in results.items()}
    base = best["without"]
    steps = results["with"][0]["steps"]
    print(f"\ncheckpoint cost: {setup}, {steps} steps, fastest of {len(results['with'])} repeats each")
    print(f"| {'checkpointing':<32} | saves | train loop s | ratio | command wall s | ratio |")
    print(f"|{'-' * 34}|------:|-------------:|------:|---------------:|------:|")
    for side, label in (("with", f"with ({saving})"), ("without", "without (training.save_steps=0)")):
        saves = len(results[side][0]["saves"])
        print(f"| {label:<32} | {saves:5d} | {best[side]['train']:12.2f} | {best[side]['train'] / base['train']:5.2f} "
              f"| {best[side]['wall']:14.1f} | {best[side]['wall'] / base['wall']:5.2f} |")
    every_save = [s for r in results["with"] for s in r["saves"]]
    if every_save:
        one_step = base["train"] / steps
        save = statistics.median(every_save)
        print(f"one save (the Trainer's save + verification, median of {len(every_save)}): {save:.3f} s "
              f"= {save / one_step:.2f} steps of {one_step:.3f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
