"""Wall time of a run with an empty stage cache, of the same run again (everything reused), and of
a run that changes only the quantization (export and evaluate re-run).

    python benchmarks/cache_rerun.py                       # experiment=smoke (about a minute)
    python benchmarks/cache_rerun.py experiment=tweets     # the default experiment (~10 minutes)

Everything goes to a temporary folder (run dirs, MLflow store, stage cache), nothing is kept.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(tmp: Path, run_dir: str, overrides: list) -> float:
    cmd = [sys.executable, "-m", "tunelab", *overrides, f"paths.run_dir={tmp}/{run_dir}",
           f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"tracking.artifact_location={tmp}/artifacts",
           f"cache.dir={tmp}/stages"]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
    summary = " ".join(done.stdout.split("run directory", 1)[-1].split())  # the report after the run
    reused = summary.split("reused ", 1)[1].split(" (")[0] if "reused " in summary else "nothing"
    print(f"  {run_dir:<12} {elapsed:7.1f} s   reused: {reused}", file=sys.stderr)
    return elapsed


def main(argv: list) -> None:
    overrides = argv or ["experiment=smoke"]
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        cold = timed(tmp, "cold", overrides)
        warm = timed(tmp, "warm", overrides)
        requant = timed(tmp, "requant", [*overrides, "quantization=f16"])
    print(f"\n{' '.join(overrides)}: wall time, stage cache in a fresh folder")
    print(f"{'run':<42} {'seconds':>8} {'vs first':>9}")
    for label, seconds in [("first run (empty cache)", cold), ("same config again (all reused)", warm),
                           ("quantization=f16 (export+evaluate re-run)", requant)]:
        print(f"{label:<42} {seconds:8.1f} {seconds / cold:8.2f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
