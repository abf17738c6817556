"""How fast prepare reads and checks rows, and what the token-length check costs.

    PYTHONPATH=src python benchmarks/prepare_throughput.py [rows]

Synthesises a CSV of distinct tweet-like rows, then times load_dataset (read, validate, duplicates)
without and with the length check (tiny model's tokenizer + its ChatML template), median of 3.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from data_helpers import dataset_cfg, meter  # noqa: E402
from tunelab.data.load import load_dataset  # noqa: E402


def timed(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(rows: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.csv"
        path.write_text("topic,tweet\n" + "".join(f"Topic number {i},THIS IS TWEET NUMBER {i} AND IT IS LOUD.\n"
                                                  for i in range(rows)))
        cfg = dataset_cfg(path)
        length_meter = meter()
        plain = timed(lambda: load_dataset(cfg, None))
        full = timed(lambda: load_dataset(cfg, length_meter))
    print(f"{'check':<36}{'seconds':>10}{'rows/s':>12}{'ratio':>8}")
    print(f"{'read + validate + duplicates':<36}{plain:>10.2f}{rows / plain:>12,.0f}{1.0:>8.2f}")
    print(f"{'... + token lengths (tokenizer+tmpl)':<36}{full:>10.2f}{rows / full:>12,.0f}{full / plain:>8.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5000)
