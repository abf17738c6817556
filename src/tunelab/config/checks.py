"""Cross-field rules, one small function each. `validate` reports every problem at once."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Callable, List

from omegaconf import DictConfig, OmegaConf

from tunelab.config.distributed import check_distributed
from tunelab.config.errors import ConfigError  # noqa: F401  (callers import it from here too)
from tunelab.data.sources import input_path_problem
from tunelab.templates.chat import BOS_POLICIES
from tunelab.templates.special_text import POLICIES as SPECIAL_TEXT_POLICIES
from tunelab.eval.device import gpu_layers_problems
from tunelab.eval.registry import metric_problems

STAGES = ("all", "prepare", "train", "export", "evaluate")
QUANT_TYPES = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_0", "q5_1",
               "q4_k_m", "q4_k_s", "q4_0", "q4_1", "q3_k_m", "q2_k")
DATASET_FORMATS = ("csv", "sharegpt", "openai", "alpaca", "hf_disk", "hub")
INVALID_ROW_POLICIES = ("fail", "quarantine")
MODEL_SOURCES = ("package_gguf", "local", "hub", "tiny")
BACKENDS = ("hf", "unsloth", "auto")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CHECKPOINTING = ("auto", "on", "off", "unsloth")
# HF schedulers that need no scheduler arguments (training.lr_scheduler passes none).
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt")
TINY_TOKENIZERS = ("smollm2", "llama3")
# Sections whose every number must be finite (nan and inf compose as floats, then fail late or silently).
NUMERIC_SECTIONS = ("dataset", "model", "lora", "quantization", "training", "eval")
# key -> (holds for a valid value, what a valid value is). None passes where the schema allows null.
RANGES = {
    "lora.alpha": (lambda v: v > 0, "must be > 0: the adapter's update is scaled by alpha / r, so 0 trains "
                                    "an adapter that changes nothing"),
    "training.warmup_ratio": (lambda v: 0 <= v < 1, "must be in [0, 1): the fraction of the steps that warm "
                                                    "the learning rate up (0: no warmup)"),
    "training.weight_decay": (lambda v: v >= 0, "must be >= 0"),
    "training.max_steps": (lambda v: v == -1 or v >= 1, "must be -1 (train for training.epochs) or >= 1"),
    "training.seed": (lambda v: 0 <= v < 2 ** 32, "must be in [0, 2**32)"),
    "training.threads": (lambda v: v >= 1, "must be >= 1 or null (null: torch's default)"),
    "eval.threads": (lambda v: v >= 1, "must be >= 1 or null (null: every core)"),
    "eval.samples_to_log": (lambda v: v >= 0, "must be >= 0"),
    "quantization.max_drop": (lambda v: v >= 0, "must be >= 0"),
}


def _choice(key: str, value, allowed) -> List[str]:
    if value not in allowed:
        return [f"{key}={value!r} is not one of {', '.join(map(str, allowed))}"]
    return []


def check_ranges(cfg) -> List[str]:
    problems = []
    for key, (holds, wanted) in RANGES.items():
        value = OmegaConf.select(cfg, key)
        finite = not isinstance(value, float) or math.isfinite(value)  # check_finite names the others
        if value is not None and finite and not holds(value):
            problems.append(f"{key}={value!r} {wanted}")
    return problems


def check_finite(cfg) -> List[str]:
    """Every float of the computing sections is a finite number (nan passes every `<` check)."""
    def walk(key: str, node) -> List[str]:
        if isinstance(node, dict):
            return [p for k, v in node.items() for p in walk(f"{key}.{k}", v)]
        if isinstance(node, list):
            return [p for i, v in enumerate(node) for p in walk(f"{key}[{i}]", v)]
        if isinstance(node, float) and not math.isfinite(node):
            return [f"{key}={node} must be a finite number"]
        return []

    return [p for section in NUMERIC_SECTIONS if section in cfg
            for p in walk(section, OmegaConf.to_container(cfg[section], resolve=True))]


def check_stage(cfg) -> List[str]:
    return _choice("stage", cfg.stage, STAGES)


def _check_source(key: str, source) -> List[str]:
    problems = _choice(f"{key}.format", source.format, DATASET_FORMATS)
    if not source.path:
        problems.append(f"{key}.path is required (a file, a folder for hf_disk, the dataset id for hub)")
    else:
        problems += _input_path(f"{key}.path", source.path, source.format)
    if source.format == "hub" and not source.revision:
        problems.append(f"{key}.revision is required for format=hub: pin a commit or tag")
    if source.rows is not None and source.weight is not None:
        problems.append(f"{key}: set rows or weight, not both")
    if source.rows is not None and source.rows < 1:
        problems.append(f"{key}.rows={source.rows} must be >= 1")
    if source.weight is not None and source.weight <= 0:
        problems.append(f"{key}.weight={source.weight} must be > 0")
    return problems


def _input_path(key: str, path, fmt: str) -> List[str]:
    problem = input_path_problem(key, path, fmt)
    return [problem] if problem else []


def check_dataset_sources(cfg) -> List[str]:
    d = cfg.dataset
    if d.sources and d.path:
        return ["dataset.path and dataset.sources are both set: list every input under dataset.sources"]
    if d.sources:
        return [p for i, source in enumerate(d.sources) for p in _check_source(f"dataset.sources[{i}]", source)]
    return _check_source("dataset", d)


def check_dataset(cfg) -> List[str]:
    d = cfg.dataset
    problems = _choice("dataset.on_invalid", d.on_invalid, INVALID_ROW_POLICIES)
    problems += _choice("dataset.special_tokens_in_text", d.special_tokens_in_text, SPECIAL_TEXT_POLICIES)
    if d.eval_path is not None:  # read in the format of the training data (eval_source)
        problems += _input_path("dataset.eval_path", d.eval_path, d.format)
    if d.eval_path is None and not 0.0 < d.eval_fraction < 1.0:
        problems.append(f"dataset.eval_fraction={d.eval_fraction} must be in (0, 1) when there is no eval_path")
    if d.max_eval_rows is not None and d.max_eval_rows < 1:
        problems.append(f"dataset.max_eval_rows={d.max_eval_rows} must be >= 1 or null")
    if d.sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", d.sha256):
        problems.append(f"dataset.sha256={d.sha256!r} must be 64 lowercase hex digits (prepare's manifest has it)")
    return problems


def check_model(cfg) -> List[str]:
    m = cfg.model
    problems = _choice("model.source", m.source, MODEL_SOURCES)
    needs = {"local": ["path"], "hub": ["hub_id"], "package_gguf": ["package", "gguf_file"]}
    for key in needs.get(m.source, []):
        if not m[key]:
            problems.append(f"model.{key} is required when model.source={m.source}")
    if m.source == "local" and m.path and not Path(m.path).is_dir():
        what = "is a file, not a folder" if Path(m.path).exists() else f"no such folder (relative to {Path.cwd()})"
        problems.append(f"model.path={m.path!r}: {what}; point it at a folder of safetensors and config.json")
    if m.source == "tiny":
        problems += check_tiny_model(m.tiny, cfg.training.max_seq_length)
    return problems


def check_tiny_model(t, max_seq_length: int) -> List[str]:
    problems = _choice("model.tiny.tokenizer", t.tokenizer, TINY_TOKENIZERS)
    sizes = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "max_position_embeddings")
    problems += [f"model.tiny.{key}={t[key]} must be >= 1" for key in sizes if t[key] < 1]
    if problems:
        return problems
    if t.hidden_size % t.num_attention_heads:
        problems.append(f"model.tiny.hidden_size={t.hidden_size} must be a multiple of "
                        f"model.tiny.num_attention_heads={t.num_attention_heads}")
    if t.num_attention_heads % t.num_key_value_heads:
        problems.append(f"model.tiny.num_attention_heads={t.num_attention_heads} must be a multiple of "
                        f"model.tiny.num_key_value_heads={t.num_key_value_heads}")
    if t.max_position_embeddings < max_seq_length:
        problems.append(f"model.tiny.max_position_embeddings={t.max_position_embeddings} is below "
                        f"training.max_seq_length={max_seq_length}: raise it or lower max_seq_length")
    return problems


def check_lora(cfg) -> List[str]:
    problems = []
    if cfg.lora.r < 1:
        problems.append(f"lora.r={cfg.lora.r} must be >= 1")
    if not 0.0 <= cfg.lora.dropout < 1.0:
        problems.append(f"lora.dropout={cfg.lora.dropout} must be in [0, 1)")
    targets = cfg.lora.target_modules
    if not (targets == "all-linear" or (OmegaConf.is_list(targets) and len(targets) > 0
                                        and all(isinstance(t, str) and t for t in targets))):
        problems.append(f"lora.target_modules={targets!r} must be all-linear or a list of module names, "
                        "e.g. [q_proj, v_proj]")
    return problems


def check_quantization(cfg) -> List[str]:
    q = cfg.quantization
    problems = [p for t in q.types for p in _choice("quantization.types[]", t, QUANT_TYPES)]
    if not q.types:
        problems.append("quantization.types is empty: name at least one type, e.g. [f16]")
    if q.ship not in q.types:
        problems.append(f"quantization.ship={q.ship!r} is not in quantization.types={list(q.types)}")
    if len(set(q.types)) < len(q.types):
        problems.append(f"quantization.types={list(q.types)} names a type twice")
    if q.max_kl is not None and q.max_kl < 0:
        problems.append(f"quantization.max_kl={q.max_kl} must be >= 0 or null")
    return problems


def check_training(cfg) -> List[str]:
    t = cfg.training
    problems = _choice("training.backend", t.backend, BACKENDS)
    problems += _choice("training.precision", t.precision, PRECISIONS)
    problems += _choice("training.gradient_checkpointing", t.gradient_checkpointing, CHECKPOINTING)
    problems += _choice("training.lr_scheduler", t.lr_scheduler, LR_SCHEDULERS)
    for key in ("batch_size", "gradient_accumulation_steps", "max_seq_length", "logging_steps"):
        if t[key] < 1:
            problems.append(f"training.{key}={t[key]} must be >= 1")
    if t.learning_rate <= 0:
        problems.append(f"training.learning_rate={t.learning_rate} must be > 0")
    if t.max_steps <= 0 and t.epochs <= 0:
        problems.append("training.epochs must be > 0 unless training.max_steps is set")
    return problems + check_checkpointing(t)


def check_checkpointing(t) -> List[str]:
    problems = []
    steps = t.save_steps
    if not (steps == "auto" or (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 0)):
        problems.append(f"training.save_steps={steps!r} must be auto, 0 (no checkpoints) or a number of steps >= 1")
    if t.save_minutes is not None and not t.save_minutes >= 0:
        problems.append(f"training.save_minutes={t.save_minutes} must be >= 0 (0 or null: save by steps only)")
    if not isinstance(t.keep_checkpoints, int) or t.keep_checkpoints < 1:
        problems.append(f"training.keep_checkpoints={t.keep_checkpoints!r} must be >= 1 (training.save_steps=0 "
                        "turns checkpoints off)")
    resume = str(t.resume)
    if resume not in ("auto", "never") and not Path(resume).is_dir():
        problems.append(f"training.resume={resume!r} is not auto, never or an existing checkpoint folder "
                        f"(relative to {Path.cwd()})")
    return problems


def check_eval(cfg) -> List[str]:
    e = cfg.eval
    problems = []
    if not e.metrics:
        problems.append("eval.metrics is empty: name at least one metric")
    problems += metric_problems(e.metrics)
    if e.metrics and e.headline not in e.metrics:
        problems.append(f"eval.headline={e.headline!r} is not one of eval.metrics: {', '.join(e.metrics)}")
    if e.max_new_tokens < 1:
        problems.append(f"eval.max_new_tokens={e.max_new_tokens} must be >= 1")
    problems += gpu_layers_problems(e.gpu_layers)
    if e.n_ctx <= e.max_new_tokens:
        problems.append(f"eval.n_ctx={e.n_ctx} leaves no room for a prompt before eval.max_new_tokens="
                        f"{e.max_new_tokens} answer tokens: raise n_ctx")
    if e.parallel_rows < 1:
        problems.append(f"eval.parallel_rows={e.parallel_rows} must be >= 1 (1: rows one at a time)")
    if e.temperature != 0:
        problems.append(f"eval.temperature={e.temperature}: evaluation decodes greedily (0.0), so that its answers "
                        "can be recomputed from the GGUF files")
    return problems


# The template contract's check 5: every run measures whether answers stop on the end-of-turn token
# and are free of role names and special-token text (by whichever name the eval config gives them).
TEMPLATE_METRICS = {
    "stop_by_eot_rate": ("tunelab.eval.metrics.stop_by_eot_rate",),
    "artifact_free_rate": ("tunelab.eval.metrics.artifact_free_rate", "tunelab.eval.metrics.template_artifact_rate"),
}


def check_template(cfg) -> List[str]:
    t = cfg.template
    problems = [] if t.bos is None else _choice("template.bos", t.bos, BOS_POLICIES)
    targets = {str(spec.get("_target_")) for spec in cfg.eval.metrics.values() if hasattr(spec, "get")}
    missing = [name for name, accepted in TEMPLATE_METRICS.items() if not targets & set(accepted)]
    if missing:
        problems.append(f"eval.metrics lacks {', '.join(missing)}: every run measures how answers stop and "
                        "whether the template leaks into them (tunelab.eval.metrics)")
    return problems


def check_sweep(cfg) -> List[str]:
    parts = cfg.sweep.objective.split(".", 2)
    example = f"finetuned.{cfg.quantization.ship}.{cfg.eval.headline}"
    if len(parts) != 3:
        return [f"sweep.objective={cfg.sweep.objective!r} must be <variant>.<quant>.<metric>, e.g. {example}"]
    variant, quant, metric = parts
    problems = _choice("sweep.objective's variant", variant, ("finetuned", "base"))
    problems += _choice("sweep.objective's quantization", quant, list(cfg.quantization.types))
    problems += _choice("sweep.objective's metric", metric, [*cfg.eval.metrics, "file_size"])
    problems += _choice("sweep.direction", cfg.sweep.direction, ("maximize", "minimize"))
    return problems


def check_paths(cfg) -> List[str]:
    return _choice("paths.foreign_files", cfg.paths.foreign_files, ("refuse", "keep"))


CHECKS: List[Callable[[DictConfig], List[str]]] = [
    check_finite, check_ranges, check_stage, check_paths, check_dataset, check_dataset_sources, check_model,
    check_lora, check_quantization, check_training, check_distributed, check_eval, check_template, check_sweep,
]


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError listing every problem found, or return quietly."""
    problems = [p for check in CHECKS for p in check(cfg)]
    if problems:
        raise ConfigError(problems)
