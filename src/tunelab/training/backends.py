"""Training backends: the model with its LoRA adapter, ready for TRL's SFTTrainer.

hf: transformers + PEFT (CPU or GPU). unsloth: Unsloth's FastLanguageModel (CUDA only; Unsloth
raises on import without a GPU, so it is imported only here, only when chosen). auto: Unsloth when
a CUDA GPU is present and Unsloth imports, else hf. Both do 16-bit LoRA and 4-bit QLoRA
(bitsandbytes NF4); export always merges into the 16-bit base checkpoint, never the 4-bit weights.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Tuple

from tunelab.config.distributed import UNSLOTH_FSDP
from tunelab.training.memory import choose_gradient_checkpointing

# lora.quant_storage -> the torch dtype's name (bnb_4bit_quant_storage accepts the name).
STORAGE = {"uint8": "uint8", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# What "all-linear" means for Llama-family models (Unsloth wants the names).
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TrainingPlan:
    backend: str
    reason: str
    dtype: Any
    load_in_4bit: bool
    gradient_checkpointing: str  # off | on | unsloth
    gc_reason: str
    notes: List[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"backend": self.backend, "backend_reason": self.reason, "dtype": str(self.dtype).replace("torch.", ""),
                "load_in_4bit": self.load_in_4bit, "gradient_checkpointing": self.gradient_checkpointing,
                "gradient_checkpointing_reason": self.gc_reason}


def select_backend(requested: str, distributed: str = "none") -> Tuple[str, str]:
    """(backend, reason) for training.backend = auto | unsloth | hf, under training.distributed."""
    import torch

    cuda = torch.cuda.is_available()
    if requested == "hf":
        return "hf", "training.backend=hf"
    if distributed == "fsdp":  # backend=unsloth with fsdp is refused up front (config.distributed)
        return "hf", f"auto: training.distributed=fsdp: {UNSLOTH_FSDP}, so TRL + PEFT under accelerate's FSDP"
    if requested == "unsloth":
        if not cuda:
            raise RuntimeError("training.backend=unsloth needs a CUDA GPU (Unsloth cannot run on the CPU); "
                               "use training.backend=auto or hf here")
        return "unsloth", "training.backend=unsloth"
    if not cuda:
        return "hf", "auto: no CUDA GPU, so TRL + PEFT"
    if importlib.util.find_spec("unsloth") is None:
        return "hf", "auto: CUDA GPU but Unsloth is not installed (pip install -e '.[gpu]'), so TRL + PEFT"
    try:
        import unsloth  # noqa: F401  (must come before transformers/trl/peft patch points are used)
    except Exception as err:  # Unsloth raises many kinds of errors on unsupported setups
        return "hf", f"auto: Unsloth failed to import ({type(err).__name__}: {err}), so TRL + PEFT"
    return "unsloth", "auto: CUDA GPU and Unsloth imports"


def training_dtype(precision: str):
    import torch

    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _target_modules(target) -> Any:
    return target if isinstance(target, str) else list(target)


def _lora_config(lora_cfg, model, tokenizer, added: dict):
    """LoRA on the configured layers; special tokens added for the template get their embedding
    rows resized in and trained (PEFT's trainable tokens), since LoRA alone would leave them noise."""
    from peft import LoraConfig

    extra = {}
    if added:
        model.resize_token_embeddings(len(tokenizer))
        extra = {"trainable_token_indices": {"embed_tokens": sorted(added.values())},
                 "ensure_weight_tying": bool(model.config.tie_word_embeddings)}
    return LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                      target_modules=_target_modules(lora_cfg.target_modules), task_type="CAUSAL_LM", **extra)


def _load_hf(cfg, base_dir: Path, plan: TrainingPlan, tokenizer=None, added_tokens=None):
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {"dtype": plan.dtype, "use_safetensors": True, "trust_remote_code": cfg.model.trust_remote_code}
    if plan.load_in_4bit:
        storage = {} if cfg.lora.quant_storage is None else {"bnb_4bit_quant_storage": STORAGE[cfg.lora.quant_storage]}
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=plan.dtype, **storage)
        # this rank's GPU (torchrun's LOCAL_RANK); FSDP then shards from there
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), **kwargs)
    if plan.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=plan.gradient_checkpointing != "off")
    return get_peft_model(model, _lora_config(cfg.lora, model, tokenizer, added_tokens or {}))


def _load_unsloth(cfg, base_dir: Path, plan: TrainingPlan, tokenizer=None, added_tokens=None):
    from unsloth import FastLanguageModel

    if added_tokens:
        raise RuntimeError(f"template.add_missing_tokens added {sorted(added_tokens)}: training new embedding rows "
                           "is supported on training.backend=hf only")
    model, _ = FastLanguageModel.from_pretrained(
        model_name=str(base_dir), max_seq_length=cfg.training.max_seq_length, dtype=plan.dtype,
        load_in_4bit=plan.load_in_4bit, local_files_only=True, trust_remote_code=cfg.model.trust_remote_code)
    target = cfg.lora.target_modules
    modules = LLAMA_LINEAR if target == "all-linear" else list(target)
    use_gc = {"off": False, "on": True, "unsloth": "unsloth"}[plan.gradient_checkpointing]
    return FastLanguageModel.get_peft_model(
        model, r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
        target_modules=modules, bias="none", use_gradient_checkpointing=use_gc,
        random_state=cfg.training.seed, max_seq_length=cfg.training.max_seq_length)


def plan_training(cfg, base_dir: Path) -> TrainingPlan:
    backend, reason = select_backend(cfg.training.backend, cfg.training.distributed)
    dtype = training_dtype(cfg.training.precision)
    load_in_4bit = bool(cfg.lora.load_in_4bit)
    if load_in_4bit and backend == "hf" and not _cuda():
        raise RuntimeError("lora.load_in_4bit=true (QLoRA) needs a CUDA GPU: bitsandbytes' 4-bit kernels are GPU-only")
    gc, gc_reason = choose_gradient_checkpointing(cfg.training, base_dir, dtype, load_in_4bit, backend)
    return TrainingPlan(backend, reason, dtype, load_in_4bit, gc, gc_reason)


def load_for_training(cfg, base_dir: Path, plan: Optional[TrainingPlan] = None, tokenizer=None,
                      added_tokens: Optional[dict] = None):
    """(peft model, plan): the base model with LoRA adapters as the plan says. Tokens the template
    added to `tokenizer` (added_tokens: text -> id) get embedding rows that are trained too."""
    plan = plan or plan_training(cfg, base_dir)
    loader = _load_unsloth if plan.backend == "unsloth" else _load_hf
    return loader(cfg, base_dir, plan, tokenizer, added_tokens), plan


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
