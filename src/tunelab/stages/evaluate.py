"""evaluate: answer the eval split with every exported GGUF (fine-tuned and base) and score it."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from hydra.utils import get_method
from rich.progress import Progress

from tunelab.data.formats import read_prepared
from tunelab.eval.generate import generate, load_gguf
from tunelab.paths import RunPaths


def _metric_functions(eval_cfg) -> dict:
    return {name: get_method(spec["_target_"]) for name, spec in eval_cfg.metrics.items()}


def quantization_verdict(per_quant: dict, headline: str, max_drop: float, ship: str) -> dict:
    """Which quantized files lose more than max_drop of the headline metric against the widest one,
    and which file to ship: the configured one if it holds up, else the smallest file that does."""
    reference = next((q for q in ("f32", "bf16", "f16") if q in per_quant), None)
    if reference is None:
        return {"reference": None, "broken": [], "ship": ship}
    floor = per_quant[reference][headline] - max_drop
    broken = [q for q, scores in per_quant.items() if scores[headline] < floor]
    healthy = sorted((q for q in per_quant if q not in broken), key=lambda q: per_quant[q]["file_size"])
    return {"reference": reference, "floor": floor, "broken": broken,
            "ship": ship if ship not in broken else (healthy[0] if healthy else None)}


def run(cfg, paths: RunPaths) -> dict:
    if not paths.export_manifest.is_file():
        raise FileNotFoundError(f"no export manifest at {paths.export_manifest}: run `tunelab stage=export` first")
    manifest = json.loads(paths.export_manifest.read_text())
    conversations = read_prepared(paths.eval_jsonl)
    metric_fns = _metric_functions(cfg.eval)
    variants = [v for v in ("finetuned", "base") if v in manifest]
    results, samples = {}, []
    paths.evaluate_dir.mkdir(parents=True, exist_ok=True)
    with Progress() as progress:
        for variant in variants:
            for quant, info in manifest[variant].items():
                task = progress.add_task(f"{variant} {quant}", total=len(conversations))
                llm = load_gguf(Path(info["path"]), cfg.eval.n_ctx, cfg.eval.threads)
                gens = generate(llm, conversations, cfg.eval.max_new_tokens, cfg.eval.temperature,
                                lambda: progress.advance(task))
                del llm
                scores = {name: float(fn(gens)) for name, fn in metric_fns.items()}
                scores["file_size"] = info["bytes"]
                results.setdefault(variant, {})[quant] = scores
                samples += [{"variant": variant, "quant": quant, **asdict(g)} for g in gens]
    summary = {"metrics": results, "headline": cfg.eval.headline, "ship": manifest["ship"],
               "eval_rows": len(conversations)}
    summary["verdict"] = quantization_verdict(results["finetuned"], cfg.eval.headline,
                                              cfg.quantization.max_drop, manifest["ship"])
    with open(paths.generations_jsonl, "w", encoding="utf-8") as handle:
        for row in samples:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    paths.metrics_json.write_text(json.dumps(results, indent=2))
    return summary
