"""benchmarks/gpu_peaks.py and the training benchmark's table: MFU against the card's own peaks."""
from __future__ import annotations

import sys
from argparse import Namespace

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_peaks  # noqa: E402
import train_throughput  # noqa: E402


def test_each_card_gets_its_own_datasheet_peak_and_an_unknown_card_none():
    assert gpu_peaks.datasheet_tflops("NVIDIA H200") == 989.4
    assert gpu_peaks.datasheet_tflops("NVIDIA H200 NVL") == 835.5
    assert gpu_peaks.datasheet_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert gpu_peaks.datasheet_tflops("NVIDIA H100 PCIe") == 756.5
    assert gpu_peaks.datasheet_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_peaks.datasheet_tflops("NVIDIA GeForce GTX 1080") is None


def test_the_table_reports_mfu_against_the_measured_and_the_datasheet_peak():
    args = Namespace(shape="1b", qlora=False, batch=8, seq=2048, gc="off", steps=8, warmup=3, max_seq=False,
                     max_seq_only=False)
    result = {"contender": "unsloth", "checkpointing": "off", "tokens_per_s": 80_000.0, "peak_gib": 4.5,
              "flops_per_s": 395e12}
    card = {"device": "NVIDIA H200", "measured_tflops": 790.0, "datasheet_tflops": 989.4}
    row = train_throughput.table([result], args, card).splitlines()[-1]
    assert "| 50.0% | 39.9% |" in row, row
    unknown = train_throughput.table([result], args, {**card, "datasheet_tflops": None}).splitlines()[-1]
    assert "| 50.0% | n/a |" in unknown, unknown
