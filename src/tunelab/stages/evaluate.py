"""evaluate: every exported GGUF (fine-tuned and base, each quantization type) answers the eval split
and is scored: the configured metrics on its answers, the perplexity of the reference answers and the
KL divergence from the reference GGUF (f16) from llama.cpp's logits, its generation speed and size.

One loaded model per GGUF serves generation, logits and speed, in one pass over the eval rows. Writes evaluate/metrics.json
({model: {quant: {name: number}}}: what DVC reads, the same for the same files and answers),
evaluate/generations.jsonl and evaluate/summary.json (speed per GGUF, which files broke, which to ship).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional

from rich.progress import Progress

from tunelab import llama_process
from tunelab.data.formats import read_prepared
from tunelab.eval.device import backend_name, resolve_gpu_layers
from tunelab.eval.generate import embedded_template, generate, load_gguf
from tunelab.eval.logits import AnswerScores, ReferenceLogprobs, answer_sequences
from tunelab.eval.metrics import higher_is_better
from tunelab.eval.registry import metrics_from_config
from tunelab.paths import RunPaths
from tunelab.records import checked_gguf

# The widest type a run exports is the reference that quantized files are compared with.
REFERENCE_TYPES = ("f32", "bf16", "f16")


def reference_quant(quants) -> Optional[str]:
    return next((q for q in REFERENCE_TYPES if q in quants), None)


def non_finite(scores: dict) -> List[str]:
    """A reason for every score that is NaN or infinite ("perplexity is nan"): no floor can judge it."""
    return [f"{name} is {value}" for name, value in scores.items()
            if isinstance(value, (int, float)) and not math.isfinite(value)]


def _flag_reasons(scores: dict, headline: str, floor: float, higher: bool, max_kl: Optional[float]) -> List[str]:
    value, reasons = scores[headline], non_finite(scores)
    if reasons:  # a NaN compares False with every floor: it must never pass for "within the floor"
        return reasons
    if (value < floor) if higher else (value > floor):
        reasons.append(f"{headline} {value:.3f} is {'below' if higher else 'above'} the floor {floor:.3f}")
    kl = scores.get("kl_divergence")
    if max_kl is not None and kl is not None and kl > max_kl:
        reasons.append(f"KL divergence {kl:.4g} is above quantization.max_kl={max_kl}")
    return reasons


def _verdict(per_quant: dict, reference: Optional[str], reasons: dict, ship: str, **extra) -> dict:
    """Ship the configured file if it holds up, else the smallest file that does, else nothing."""
    healthy = sorted((q for q in per_quant if q not in reasons), key=lambda q: per_quant[q]["file_size"])
    return {"reference": reference, **extra, "broken": [q for q in per_quant if q in reasons], "reasons": reasons,
            "ship": ship if ship in healthy else (healthy[0] if healthy else None)}


def quantization_verdict(per_quant: dict, headline: str, max_drop: float, ship: str,
                         max_kl: Optional[float] = None, higher: bool = True) -> dict:
    """Which quantized files lose more than max_drop of the headline metric against the widest one
    (or drift further than max_kl from it), and which file to ship: the configured one if it holds
    up, else the smallest file that does. A file with a non-finite score is BROKEN; so is every
    file when the reference's scores are not finite, since nothing can be compared with it."""
    reference = reference_quant(per_quant)
    if reference is None:
        reasons = {q: why for q, scores in per_quant.items() if (why := non_finite(scores))}
        return _verdict(per_quant, None, reasons, ship)
    ref_broken = non_finite(per_quant[reference])
    if ref_broken:
        why = f"cannot be compared with {reference}: the reference is broken ({', '.join(ref_broken)})"
        reasons = {q: (ref_broken if q == reference else non_finite(scores) + [why]) for q, scores in per_quant.items()}
        return _verdict(per_quant, reference, reasons, ship, floor=None)
    floor = per_quant[reference][headline] + (-max_drop if higher else max_drop)
    reasons = {q: why for q, scores in per_quant.items() if (why := _flag_reasons(scores, headline, floor, higher, max_kl))}
    return _verdict(per_quant, reference, reasons, ship, floor=floor)


class _References:
    """Per model (fine-tuned, base): the reference GGUF's answer log-probabilities, for KL."""

    def __init__(self, directory: Path):
        self.directory, self.stores = directory, {}

    def scorer(self, variant: str, quant: str, is_reference: bool):
        """What scores one GGUF's logits (an AnswerScores for its answer sequences): the reference
        records its log-probabilities, the others are compared with them."""
        def scores(llm, sequences) -> AnswerScores:
            if is_reference:
                self.stores[variant] = ReferenceLogprobs(self.directory, variant, sequences, llm.n_vocab())
                return AnswerScores(sequences, record=self.stores[variant])
            reference = self.stores.get(variant)
            if reference is not None:
                reference.check_same_tokens(sequences, f"{variant} {quant}")
            return AnswerScores(sequences, reference=reference)
        return scores

    def close(self, variant: Optional[str] = None) -> None:
        for name in [variant] if variant else list(self.stores):
            if name in self.stores:
                self.stores.pop(name).close()


def evaluate_gguf(cfg, path: Path, conversations, metric_fns: dict, score_logits=None, progress=None):
    """Scores of one GGUF, its generations and its speed, from one loaded model and one pass over
    the eval rows (generation and, with score_logits, the logit pass)."""
    llm = load_gguf(path, cfg.eval.n_ctx, cfg.eval.threads, resolve_gpu_layers(cfg.eval.gpu_layers))
    template = embedded_template(llm, path)
    logit_scores = None
    if score_logits is not None:
        logit_scores = score_logits(llm, answer_sequences(llm, template, conversations, cfg.eval.n_ctx))
    gens, speed = generate(llm, template, conversations, cfg.eval.max_new_tokens, cfg.eval.temperature,
                           list(cfg.template.stop), progress, logit_scores, cfg.eval.parallel_rows)
    scores = {name: float(fn(gens)) for name, fn in metric_fns.items()}
    if logit_scores is not None:
        scores.update(logit_scores.result())
    scores["file_size"] = path.stat().st_size
    return scores, gens, speed


def _ordered(files: dict) -> list:
    """The reference type first: the others' KL divergence is measured against it."""
    reference = reference_quant(files)
    return sorted(files.items(), key=lambda item: item[0] != reference)


def run(cfg, paths: RunPaths) -> dict:
    """In llama.cpp's own process where it needs one (tunelab.llama_process: a GPU build beside torch)."""
    if not paths.export_manifest.is_file():
        raise FileNotFoundError(f"no export manifest at {paths.export_manifest}: run `tunelab stage=export` first")
    return llama_process.call("tunelab.stages.evaluate:evaluate_here", cfg, run_dir=str(paths.run_dir),
                              cache_dir=str(paths.cache_dir))


def evaluate_here(cfg, run_dir: str, cache_dir: str) -> dict:
    paths = RunPaths(Path(run_dir), Path(cache_dir))
    manifest = json.loads(paths.export_manifest.read_text())
    conversations = read_prepared(paths.eval_jsonl)
    metric_fns = metrics_from_config(cfg.eval.metrics)
    variants = [v for v in ("finetuned", "base") if v in manifest]
    results: Dict[str, dict] = {}
    speeds: Dict[str, dict] = {}
    samples = []
    paths.evaluate_dir.mkdir(parents=True, exist_ok=True)
    logits = _References(paths.evaluate_dir) if cfg.eval.logit_metrics else None
    try:
        with Progress() as progress:
            for variant in variants:
                reference = reference_quant(manifest[variant])
                for quant, info in _ordered(manifest[variant]):
                    task = progress.add_task(f"{variant} {quant}", total=len(conversations))
                    scorer = logits.scorer(variant, quant, quant == reference) if logits else None
                    started = time.monotonic()
                    scores, gens, speed = evaluate_gguf(cfg, checked_gguf(info, f"the {variant} {quant} GGUF"), conversations,
                                                        metric_fns, scorer, lambda: progress.advance(task))
                    if not progress.console.is_terminal:  # no live bars in a log file: a line per GGUF
                        progress.console.print(f"evaluated {variant} {quant}: {len(conversations)} rows in "
                                               f"{time.monotonic() - started:.1f} s", highlight=False)
                    results.setdefault(variant, {})[quant] = scores
                    speeds.setdefault(variant, {})[quant] = speed.as_dict()
                    samples += [{"variant": variant, "quant": quant, **asdict(g)} for g in gens]
                if logits is not None:
                    logits.close(variant)
    finally:
        if logits is not None:
            logits.close()
    return _summarize(cfg, paths, manifest, results, speeds, samples, higher_is_better(metric_fns[cfg.eval.headline]),
                      len(conversations))


def _summarize(cfg, paths: RunPaths, manifest: dict, results: dict, speeds: dict, samples: list, higher: bool,
               eval_rows: int) -> dict:
    headline = cfg.eval.headline
    verdict = quantization_verdict(results["finetuned"], headline, cfg.quantization.max_drop, manifest["ship"],
                                   cfg.quantization.max_kl, higher)
    shipped = manifest["finetuned"][verdict["ship"]] if verdict["ship"] else {}
    verdict["ship_path"], verdict["ship_sha256"] = shipped.get("path"), shipped.get("sha256")
    summary = {"metrics": results, "headline": headline, "headline_higher_is_better": higher,
               "ship": manifest["ship"], "eval_rows": eval_rows, "speed": speeds, "verdict": verdict,
               "kl_floor_unchecked": cfg.quantization.max_kl is not None and not cfg.eval.logit_metrics,
               # how the answers were decoded: what `tunelab serve` and the printed commands set too
               "decoding": {"engine": "llama-cpp-python", "backend": backend_name(resolve_gpu_layers(cfg.eval.gpu_layers)),
                            **manifest.get("serve", {}).get("settings", {})},
               "gguf_sha256": {v: {q: manifest[v][q]["sha256"] for q in results[v]} for v in results}}
    _write(paths.generations_jsonl, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in samples))
    _write(paths.evaluation_summary, json.dumps({k: v for k, v in summary.items() if k != "metrics"}, indent=2))
    _write(paths.metrics_json, json.dumps(results, indent=2))
    return summary


def _write(path: Path, text: str) -> None:
    """Whole or not at all: an interrupted run leaves the previous file, not half of a new one."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
