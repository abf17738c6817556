"""train: LoRA on the prepared conversations, loss on the assistant turns only.

Backends (tunelab.training.backends): `hf` (PEFT) and `unsloth`, both trained by TRL's SFTTrainer;
`auto` picks Unsloth on a CUDA GPU. The tokenized dataset carries `labels` with
-100 everywhere but the assistant content and its end-of-turn token, built by the template
contract (tunelab.templates.chat), so what is trained is exactly what export writes into the GGUF.
"""
from __future__ import annotations

import json
import signal
from contextlib import contextmanager
from pathlib import Path

from tunelab import runstate
from tunelab.config.identity import file_sha256
from tunelab.data.formats import read_prepared
from tunelab.models.source import load_tokenizer, resolve_model
from tunelab.paths import RunPaths
from tunelab.templates.chat import TemplateError, template_from_config, template_tokenizer, tokenize_conversation
from tunelab.templates.parity import training_contract
from tunelab.training import checkpoints, launch, resume
from tunelab.training.backends import load_for_training, plan_training
from tunelab.training.callbacks import CheckpointPolicy, make_callbacks, say


class NullReporter:
    """Where the live curve goes when nothing tracks the run."""

    run_id = None

    def log_metrics(self, metrics: dict, step: int) -> None:
        pass

    def set_tags(self, tags: dict) -> None:
        pass


def build_dataset(conversations, template, tokenizer, max_length: int, special_text: str = "error"):
    """special_text: dataset.special_tokens_in_text, as prepare's length check used it."""
    from datasets import Dataset

    rows, problems = [], []
    for number, messages in enumerate(conversations, start=1):
        try:
            encoded = tokenize_conversation(template, tokenizer, messages, max_length, special_text=special_text)
        except TemplateError as err:
            problems.append(f"prepared row {number}: {err}")
            continue
        labels = [i if m else -100 for i, m in zip(encoded["input_ids"], encoded["assistant_masks"])]
        rows.append({"input_ids": encoded["input_ids"], "labels": labels})
    if problems:
        raise TemplateError("rows the template cannot train on:\n  " + "\n  ".join(problems[:20]))
    return Dataset.from_list(rows)


def _trainer_class():
    """TRL's SFTTrainer; on a device without TRL's Triton loss kernel, with the model's own loss.

    TRL 1.15 always computes the SFT loss with a Triton kernel (CUDA/XPU only), so on the CPU its
    compute_loss fails. The model's own cross-entropy over the same labels is the same loss.
    """
    from transformers import Trainer
    from trl import SFTTrainer
    from trl.trainer import utils as trl_utils

    class TunelabSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            on_kernel_device = next(model.parameters()).device.type in ("cuda", "xpu")
            if trl_utils._ChunkedLogProbFunction is not None and on_kernel_device:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

        def _load_optimizer_and_scheduler(self, checkpoint):
            if checkpoint is None or self.args.world_size == 1 or self.args.device.type != "cpu":
                return super()._load_optimizer_and_scheduler(checkpoint)
            with _cpu_map_location():
                return super()._load_optimizer_and_scheduler(checkpoint)

    return TunelabSFTTrainer


@contextmanager
def _cpu_map_location():
    """transformers 5.17 loads a multi-process optimizer state to args.device, which under CPU DDP is
    `cpu:<rank>`: a location torch.load cannot restore (resume failed). Within this block torch.load reads
    such a map_location as plain "cpu" (the same memory)."""
    import torch

    original = torch.load

    def load(*args, map_location=None, **kwargs):
        if isinstance(map_location, torch.device) and map_location.type == "cpu":
            map_location = "cpu"
        return original(*args, map_location=map_location, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def _sft_config(training_cfg, out_dir: Path, plan):
    import torch
    from trl import SFTConfig

    dtype = plan.dtype
    return SFTConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=training_cfg.batch_size,
        gradient_accumulation_steps=training_cfg.gradient_accumulation_steps,
        num_train_epochs=training_cfg.epochs,
        max_steps=training_cfg.max_steps,
        learning_rate=training_cfg.learning_rate,
        lr_scheduler_type=training_cfg.lr_scheduler,
        warmup_steps=training_cfg.warmup_ratio,
        weight_decay=training_cfg.weight_decay,
        logging_steps=training_cfg.logging_steps,
        # tunelab decides when to save (CheckpointPolicy sets should_save) and rotates itself, after
        # verifying the newer checkpoint: HF's own schedule and save_total_limit stay off.
        save_strategy="no",
        report_to="none",
        seed=training_cfg.seed,
        data_seed=training_cfg.seed,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=not torch.cuda.is_available(),
        # Rows are tokenized and labelled already (the template contract); TRL only packs them.
        max_length=training_cfg.max_seq_length if training_cfg.packing else None,
        packing=training_cfg.packing,
        packing_strategy="bfd",
        padding_free=training_cfg.packing or training_cfg.padding_free,
        dataset_kwargs={"skip_prepare_dataset": not training_cfg.packing},
        remove_unused_columns=False,
        disable_tqdm=False,
        # Unsloth applies its own checkpointing inside the model; the Trainer's is for hf only.
        gradient_checkpointing=plan.backend == "hf" and plan.gradient_checkpointing != "off",
        gradient_checkpointing_kwargs={"use_reentrant": False},
        **_parallel_args(training_cfg),
    )


# training.distributed=fsdp: accelerate's FSDP2, each decoder layer a unit (the model's _no_split_modules),
# the whole state dict gathered to rank 0 for the adapter's save.
FSDP_CONFIG = {"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "reshard_after_forward": True,
               "state_dict_type": "FULL_STATE_DICT"}


def _parallel_args(training_cfg) -> dict:
    """SFTConfig's arguments for several ranks (their env comes from tunelab.training.launch)."""
    import torch

    if training_cfg.distributed == "none":
        return {}
    # Every LoRA weight gets a gradient each step: DDP need not search for unused ones.
    args = {"ddp_backend": "nccl" if torch.cuda.is_available() else "gloo", "ddp_find_unused_parameters": False}
    if training_cfg.distributed == "fsdp":
        args.update(fsdp="full_shard auto_wrap", fsdp_config=dict(FSDP_CONFIG))
    return args


def make_trainer(cfg, model, tokenizer, dataset, out_dir: Path, plan, callbacks=()):
    """TRL's SFTTrainer for an already tokenized dataset (input_ids + labels)."""
    return _trainer_class()(model=model, args=_sft_config(cfg.training, out_dir, plan),
                            train_dataset=dataset, processing_class=tokenizer, callbacks=list(callbacks))


def run(cfg, paths: RunPaths, reporter=None) -> dict:
    """Train a LoRA adapter; write it, its tokenizer and loss.jsonl under paths.train_dir, checkpoints
    under paths.checkpoints_dir. reporter (log_metrics, set_tags, run_id) gets the live curve. Under
    training.distributed the ranks train (tunelab.training.launch) and this process reports for them."""
    reporter = reporter or NullReporter()
    if cfg.training.distributed != "none" and launch.rank() is None:
        return launch.run_ranks(cfg, paths, reporter)
    return train_here(cfg, paths, reporter)


def train_here(cfg, paths: RunPaths, reporter) -> dict:
    """The training itself, in this process: alone, or as one rank (only rank 0 writes files)."""
    import torch
    from transformers import set_seed

    main = (launch.rank() or 0) == 0
    if cfg.training.threads:
        torch.set_num_threads(cfg.training.threads)
    base_dir = resolve_model(cfg.model, paths)
    plan = plan_training(cfg, base_dir)  # imports Unsloth first when it is the backend
    tokenizer, added = template_tokenizer(cfg.template, lambda: load_tokenizer(base_dir, cfg.model.trust_remote_code))
    template = template_from_config(cfg.template, tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = template.end_of_turn  # padding carries no loss: labels are -100 there
    conversations = read_prepared(paths.train_jsonl)
    dataset = build_dataset(conversations, template, tokenizer, cfg.training.max_seq_length,
                            cfg.dataset.special_tokens_in_text)
    contract = training_contract(template, tokenizer, dataset["labels"], conversations, added)
    set_seed(cfg.training.seed)  # LoRA's A matrices are random: seed them, or no two runs match
    model, plan = load_for_training(cfg, base_dir, plan, tokenizer=tokenizer, added_tokens=added)

    if main:
        paths.train_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(paths.train_tokenizer_dir)
        contract.write(paths.template_contract)
        paths.loss_log.unlink(missing_ok=True)
    trainer = make_trainer(cfg, model, tokenizer, dataset, paths.checkpoints_dir, plan)
    result, resumed_from = _train(cfg, paths, reporter, trainer, main)
    _save_adapter(cfg, trainer, model, paths, main)
    if not main:
        return {}
    summary = {
        "base_model_dir": str(base_dir),
        "end_of_turn": template.end_of_turn,
        "train_rows": len(dataset),
        "steps": result.global_step,
        "train_loss": resume.mean_loss(paths.loss_log) if resumed_from else result.training_loss,  # the mean
        "final_loss": resume.final_loss(paths.loss_log),  # the last logged loss
        "train_runtime_s": result.metrics.get("train_runtime"),  # after a resume: the resumed part
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        **plan.as_dict(),
        "eot_loss_tokens": contract.eot_loss_tokens,
        "eot_inside_answers": contract.eot_inside_answers,
        "added_tokens": added,
        "resumed_from": resumed_from,
        "distributed": cfg.training.distributed,
        "world_size": trainer.args.world_size,  # every rank, on every node
        "nnodes": cfg.training.nnodes if cfg.training.distributed != "none" else 1,
    }
    (paths.train_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _save_adapter(cfg, trainer, model, paths: RunPaths, main: bool) -> None:
    """The adapter, by rank 0. Under fsdp each rank holds a shard: the state dict is gathered first
    (a collective: every rank calls it)."""
    state = trainer.accelerator.get_state_dict(trainer.model) if cfg.training.distributed == "fsdp" else None
    if main:
        model.save_pretrained(paths.adapter_dir, **({"state_dict": state} if state is not None else {}))


def _train(cfg, paths: RunPaths, reporter, trainer, main: bool = True):
    """trainer.train(), from the checkpoint training.resume picks, saving checkpoints as the policy
    says. A first SIGTERM/SIGINT saves a checkpoint at the end of the step, then is raised here.
    Every rank picks the same checkpoint (the same files); rank 0 alone continues the curve."""
    world_size = trainer.args.world_size
    identity = checkpoints.training_identity(cfg, file_sha256(paths.train_jsonl), world_size)
    start = resume.choose(str(cfg.training.resume), paths.checkpoints_dir, identity, world_size)
    resumed_from = None
    if start:
        resumed_from = resume.continue_curve(start, paths.loss_log, reporter) if main else resume.describe(start)
        if not main:
            say(f"resuming from step {resumed_from['step']}: {start} (rank 0 continues the curve)")
    with runstate.deferred_interrupts() as pending:
        policy = CheckpointPolicy(paths.checkpoints_dir, cfg.training, identity, world_size, reporter.run_id, pending,
                                  main)
        for callback in make_callbacks(paths.loss_log, reporter, policy):
            trainer.add_callback(callback)
        result = trainer.train(resume_from_checkpoint=str(start) if start else None)
    if policy.interrupt_step is not None and not pending:
        # The ranks agreed to stop because a signal reached another one (on another node, perhaps): this
        # training is interrupted here too, not finished (rank 0 would otherwise save a partial adapter).
        pending.signum = signal.SIGTERM
    runstate.raise_pending(pending)  # the run ends KILLED, as it would have without the deferral
    return result, resumed_from
