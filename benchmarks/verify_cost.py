"""What verifying every byte costs: on an unchanged re-run, and on one multi-GB file.

    python benchmarks/verify_cost.py                         # experiment=smoke, a 4 GB file
    python benchmarks/verify_cost.py --gb 8 experiment=tweets
    python benchmarks/verify_cost.py --file-only             # part 2 only

Part 1 runs the experiment once (fresh stage cache, in a temporary folder), then twice unchanged:
in the same run directory (every file verified in place) and into a new one (every file copied out
of the cache while it is hashed). Beside each: the time to sha256 the bytes tunelab verified, and to
merely read them, measured in this process on the same files. Part 2 times, on one file of --gb GB
(in the page cache: this is the CPU's cost, not the disk's): a plain read, sha256, a plain copy, and
tunelab's verified copy (copy + sha256 in one pass, as a cache restore does).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from tunelab.cache import copy_hashed  # noqa: E402

CHUNK = 1 << 22


def run(tmp: Path, run_dir: str, overrides: list) -> float:
    cmd = [sys.executable, "-m", "tunelab", *overrides, f"paths.run_dir={tmp}/{run_dir}",
           f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"tracking.artifact_location={tmp}/artifacts",
           f"cache.dir={tmp}/stages"]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def read_all(paths) -> float:
    start = time.perf_counter()
    for path in paths:
        with open(path, "rb") as handle:
            while handle.read(CHUNK):
                pass
    return time.perf_counter() - start


def hash_all(paths) -> float:
    start = time.perf_counter()
    for path in paths:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while block := handle.read(CHUNK):
                digest.update(block)
    return time.perf_counter() - start


def verified_files(tmp: Path, run_dir: str, overrides: list) -> list:
    """What a re-run hashes: the run's stage folders and the base model's files."""
    from tunelab.config.compose import compose
    from tunelab.models.source import resolve_model
    from tunelab.paths import RunPaths

    os.chdir(ROOT)
    cfg = compose(overrides)
    model_dir = resolve_model(cfg.model, RunPaths.from_config(cfg.paths))
    stages = [p for stage in ("prepare", "train", "export", "evaluate") for p in (tmp / run_dir / stage).rglob("*")]
    return [p for p in stages + list(model_dir.rglob("*")) if p.is_file()]


def part_one(overrides: list) -> None:
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        first = run(tmp, "run", overrides)
        same = run(tmp, "run", overrides)
        other = run(tmp, "other", overrides)
        files = verified_files(tmp, "run", overrides)
        size = sum(p.stat().st_size for p in files)
        hashing, reading = hash_all(files), read_all(files)
    print(f"\n{' '.join(overrides)}: {len(files)} files, {size / 1e6:,.0f} MB verified per re-run")
    print(f"{'':<44} {'seconds':>8} {'vs first run':>13} {'sha256 share':>13}")
    print(f"{'first run (empty cache)':<44} {first:8.1f} {1:13.2f}")
    for label, seconds in (("unchanged, same run dir (verified in place)", same),
                           ("unchanged, new run dir (restored + verified)", other)):
        print(f"{label:<44} {seconds:8.1f} {seconds / first:13.3f} {hashing / seconds:13.3f}")
    print(f"{'sha256 of those bytes':<44} {hashing:8.2f}   read only: {reading:.2f} s "
          f"(sha256 / read {hashing / max(reading, 1e-9):.2f}x)")


def part_two(gigabytes: float) -> None:
    with tempfile.TemporaryDirectory(dir=ROOT) as name:
        big = Path(name) / "big.bin"
        block = os.urandom(CHUNK)
        with open(big, "wb") as handle:
            for _ in range(int(gigabytes * (1 << 30) / CHUNK)):
                handle.write(block)
        size = big.stat().st_size
        reading = read_all([big])
        hashing = hash_all([big])
        start = time.perf_counter()
        shutil.copyfile(big, big.with_suffix(".copy"))
        copying = time.perf_counter() - start
        big.with_suffix(".copy").unlink()
        start = time.perf_counter()
        copy_hashed(big, big.with_suffix(".verified"))
        verified = time.perf_counter() - start
    print(f"\none file of {size / (1 << 30):.1f} GiB (page cache)")
    print(f"{'':<34} {'seconds':>8} {'GB/s':>6} {'ratio':>22}")
    print(f"{'read':<34} {reading:8.2f} {size / reading / 1e9:6.2f}")
    print(f"{'sha256':<34} {hashing:8.2f} {size / hashing / 1e9:6.2f} {hashing / reading:10.2f}x of a read")
    print(f"{'copy (shutil.copyfile)':<34} {copying:8.2f} {size / copying / 1e9:6.2f}")
    print(f"{'verified copy (copy + sha256)':<34} {verified:8.2f} {size / verified / 1e9:6.2f} "
          f"{verified / copying:10.2f}x of a copy")


def main(argv: list) -> None:
    gigabytes = 4.0
    if "--gb" in argv:
        index = argv.index("--gb")
        gigabytes = float(argv[index + 1])
        argv = argv[:index] + argv[index + 2:]
    if "--file-only" in argv:
        argv.remove("--file-only")
    else:
        part_one(argv or ["experiment=smoke"])
    part_two(gigabytes)


if __name__ == "__main__":
    main(sys.argv[1:])
