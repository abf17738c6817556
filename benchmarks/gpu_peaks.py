"""The two peaks LoRA-MFU is reported against, per detected GPU: the bf16 matrix-product rate measured
on this card now (what is reachable), and the card's datasheet dense bf16 rate (what is advertised).

Datasheet figures are NVIDIA's dense (no sparsity) bf16 tensor-core numbers; a card not listed gets
no datasheet MFU rather than another card's number.
"""
from __future__ import annotations

import statistics
from typing import Optional

# substring of torch.cuda.get_device_name() -> dense bf16 TFLOP/s from the card's datasheet
DATASHEET_BF16_TFLOPS = (
    ("H200", 989.4),           # H200 SXM (the NVL form factor differs; it names itself "H200 NVL")
    ("H100 80GB HBM3", 989.4),  # H100 SXM
    ("H100 SXM", 989.4),
    ("H100 NVL", 835.5),
    ("H100 PCIe", 756.5),
    ("A100", 312.0),
    ("L40S", 362.05),
    ("L4", 121.0),
)


def datasheet_tflops(device_name: str) -> Optional[float]:
    """The datasheet peak of the named card; NVL parts checked before their SXM namesakes."""
    if "H200 NVL" in device_name:
        return 835.5
    for key, tflops in DATASHEET_BF16_TFLOPS:
        if key in device_name:
            return tflops
    return None


def measured_tflops(size: int = 8192, warmup: int = 3, repeats: int = 10) -> float:
    """Median rate of a size^3 bf16 matrix product on random data, timed with CUDA events."""
    import torch

    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(warmup):
        a @ b
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return 2 * size ** 3 / statistics.median(times) / 1e12


def peaks() -> dict:
    """{"device", "measured_tflops", "datasheet_tflops"} of GPU 0."""
    import torch

    name = torch.cuda.get_device_name(0)
    measured = measured_tflops()
    torch.cuda.empty_cache()  # the contenders run in processes of their own; leave them the memory
    return {"device": name, "measured_tflops": measured, "datasheet_tflops": datasheet_tflops(name)}
