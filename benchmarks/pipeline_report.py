"""The tables of benchmarks/pipeline_gpu.py, from its results.json (markdown, as docs/benchmarks.md shows them).

    python benchmarks/pipeline_report.py /tmp/tunelab-pipeline-bench/8b/results.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

TUNELAB_STEPS = [("export: merge (load, merge, check, write merged/)", "export.merge", "merge"),
                 ("export: llama.cpp's converter (f16)", "export.convert", "convert"),
                 ("export: llama.cpp's quantizer (q5_k_m)", "export.quantize", "quantize"),
                 ("export: parity gate", "export.gate", None)]


def _cell(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _ratio(ours: Optional[float], theirs: Optional[float]) -> str:
    return f"{ours / theirs:.3f}x" if ours and theirs else "-"


def stage_table(results: dict) -> List[str]:
    ours = results["tunelab"]["seconds"]
    bare = (results.get("bare") or {}).get("seconds", {})
    bare_eval = sum(v for k, v in bare.items() if k.startswith("answer")) if bare else None
    bare_total = sum(bare.values()) if bare else None
    lines = ["| stage | tunelab s | bare script s | tunelab / bare |", "|---|---:|---:|---:|",
             f"| prepare | {_cell(ours.get('prepare'))} | - | |",
             f"| train ({results['tunelab']['train'].get('backend')}, {results['tunelab']['train'].get('steps', '?')} "
             f"steps) | {_cell(ours.get('train'))} | - | see train_throughput.py |"]
    for name, key, bare_key in TUNELAB_STEPS:
        theirs = bare.get(bare_key) if bare_key else None
        lines.append(f"| {name} | {_cell(ours.get(key))} | {_cell(theirs)} | {_ratio(ours.get(key), theirs)} |")
    lines += [f"| export (stage: + hashes, records, serving files) | {_cell(ours.get('export'))} | "
              f"{_cell(sum(bare.get(k, 0) for k in ('merge', 'convert', 'quantize')) if bare else None)} | "
              f"{_ratio(ours.get('export'), sum(bare.get(k, 0) for k in ('merge', 'convert', 'quantize')) if bare else None)} |",
              f"| evaluate (f16 + q5_k_m; tunelab adds the logit pass) | {_cell(ours.get('evaluate'))} | "
              f"{_cell(bare_eval)} | {_ratio(ours.get('evaluate'), bare_eval)} |",
              f"| **export + evaluate** | **{_cell(ours.get('export', 0) + ours.get('evaluate', 0))}** | "
              f"**{_cell(bare_total)}** | **{_ratio(ours.get('export', 0) + ours.get('evaluate', 0), bare_total)}** |",
              f"| whole pipeline (process start to exit) | {_cell(results['tunelab']['wall'])} | | |"]
    return lines


def device_table(results: dict) -> List[str]:
    cpu = results.get("cpu")
    if not cpu:
        return []
    lines = [f"| GGUF | rows | GPU s | CPU s | GPU speedup | gen tok/s GPU | gen tok/s CPU | answers equal |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for quant, sides in cpu["results"].items():
        gpu, host = sides["gpu"], sides["cpu"]
        same = sum(a == b for a, b in zip(gpu["answers"], host["answers"]))
        lines.append(f"| {quant} | {len(gpu['answers'])} | {gpu['seconds']:.1f} | {host['seconds']:.1f} | "
                     f"{host['seconds'] / gpu['seconds']:.1f}x | {gpu['speed'].get('gen_tokens_per_s', 0):,.1f} | "
                     f"{host['speed'].get('gen_tokens_per_s', 0):,.1f} | {same}/{len(gpu['answers'])} |")
    return lines


def answers_line(results: dict) -> str:
    bare = results.get("bare")
    if not bare:
        return ""
    ours = results["tunelab"]["answers"]
    parts = [f"{quant} {sum(a == b for a, b in zip(ours.get(quant, []), theirs))}/{len(theirs)}"
             for quant, theirs in bare["answers"].items()]
    return "answers equal, tunelab vs the bare script (create_chat_completion): " + ", ".join(parts)


def probe_line(results: dict) -> str:
    speed = results["tunelab"]["speed"].get("finetuned", {})
    parts = [f"{quant} {timing.get('rows_together')} rows" for quant, timing in speed.items()]
    return ("tunelab's evaluation, rows that took their greedy steps together (probe: logits bitwise equal to "
            "a row alone): " + ", ".join(parts))


def report(results: dict) -> str:
    machine = results.get("machine", {})
    head = (f"{results.get('shape', '?')} shape on {machine.get('gpu', '?')}, {machine.get('cpus', '?')} CPUs; "
            f"evaluation decoded on {results['tunelab']['decoding'].get('backend', '?')}")
    parts = [head, "", *stage_table(results), "", *device_table(results), "", answers_line(results),
             probe_line(results)]
    return "\n".join(parts)


if __name__ == "__main__":
    print(report(json.loads(Path(sys.argv[1]).read_text())))
