"""training.distributed (none | ddp | fsdp), training.nproc_per_node and lora.quant_storage: the rules.

The Hydra process checks these once, up front, with every other rule (tunelab.config.checks), and
`resolve` fixes what `auto` means before the config is hashed and handed to the ranks, so that every
rank trains the same resolved config and the config hash names the world size that was used.

- nproc_per_node=auto is the number of CUDA devices; without CUDA it must be a number (CPU DDP, gloo).
- fsdp needs CUDA (NCCL, and accelerate's FSDP shards onto GPUs); on the CPU use ddp.
- QLoRA (lora.load_in_4bit) under fsdp: the packed 4-bit weights must be stored in the compute dtype
  (bitsandbytes' bnb_4bit_quant_storage) or FSDP cannot shard them with the other parameters in one
  flat dtype. null sets it to the compute dtype; any other value is refused with that reason.
- nnodes=auto is the node count of this SLURM job (tunelab.config.slurm), 1 outside SLURM; several
  nodes need ddp or fsdp (each node would otherwise run the whole pipeline), and a number must be that
  count. The world is nproc_per_node x nnodes ranks (every node starts nproc_per_node of them).
- Unsloth 2026.10.9 runs under DDP (it pins each rank to cuda:LOCAL_RANK); its FSDP2 path is
  switched on by its own launcher environment (UNSLOTH_FSDP2) and is not wired into tunelab, so fsdp
  trains with TRL + PEFT (backend auto says so; backend=unsloth with fsdp is refused).
"""
from __future__ import annotations

from typing import List, Optional

from tunelab.config import slurm

MODES = ("none", "ddp", "fsdp")
QUANT_STORAGE = ("uint8", "fp32", "bf16", "fp16")
# training.precision -> the dtype name lora.quant_storage uses for it (auto is resolved on the GPU).
PRECISION_STORAGE = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}
UNSLOTH_FSDP = ("Unsloth 2026.10.9's FSDP2 path is switched on by its own launcher environment "
                "(UNSLOTH_FSDP2) and is not wired into tunelab")


def cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def local_world_size(training_cfg, cuda: Optional[int] = None) -> int:
    """How many rank processes each node runs: 1 without training.distributed, else nproc_per_node
    (auto: the CUDA devices). Call after check_distributed found no problem."""
    if training_cfg.distributed == "none":
        return 1
    value = training_cfg.nproc_per_node
    return int(value) if _is_int(value) else (cuda_count() if cuda is None else cuda)


def node_count(training_cfg) -> int:
    """The nodes training spans: training.nnodes, auto being this SLURM job's node count (1 outside SLURM)."""
    value = training_cfg.nnodes
    if _is_int(value):
        return int(value)
    job = slurm.job_nodes()
    return job.count if job else 1


def world_size(training_cfg, cuda: Optional[int] = None) -> int:
    """Every rank of the training, on all nodes."""
    return local_world_size(training_cfg, cuda) * node_count(training_cfg)


def compute_storage(precision: str, cuda: bool) -> str:
    """The quant_storage name of the compute dtype training.precision gives (backends.training_dtype)."""
    if precision != "auto":
        return PRECISION_STORAGE[precision]
    if not cuda:
        return "fp32"
    import torch

    return "bf16" if torch.cuda.is_bf16_supported() else "fp32"


def _nproc_problems(t, cuda: int) -> List[str]:
    value = t.nproc_per_node
    if t.distributed == "none":
        if value not in ("auto", 1):
            return [f"training.nproc_per_node={value!r} has no effect with training.distributed=none: set "
                    "training.distributed=ddp (or fsdp) to train on several processes, or leave it at auto"]
        return []
    if not (value == "auto" or (_is_int(value) and value >= 1)):
        return [f"training.nproc_per_node={value!r} must be auto (one process per CUDA device) or a number >= 1"]
    if value == "auto" and cuda == 0 and t.distributed == "ddp":  # fsdp without CUDA: refused as such
        return ["training.nproc_per_node=auto counts CUDA devices and this machine has none: give the number of "
                "CPU processes for training.distributed=ddp (e.g. training.nproc_per_node=2)"]
    if _is_int(value) and cuda and value > cuda:
        return [f"training.nproc_per_node={value} is more than the {cuda} CUDA device(s) here: one rank per GPU"]
    return []


def _fsdp_problems(cfg, cuda: int) -> List[str]:
    t, lora = cfg.training, cfg.lora
    problems = []
    if cuda == 0:
        problems.append("training.distributed=fsdp needs CUDA GPUs: FSDP shards the model over GPUs through NCCL; "
                        "on the CPU use training.distributed=ddp (gloo), which trains the same model")
    if t.backend == "unsloth":
        problems.append(f"training.backend=unsloth with training.distributed=fsdp: {UNSLOTH_FSDP}; use "
                        "training.backend=auto or hf (TRL + PEFT under accelerate's FSDP), or training.distributed=ddp")
    storage = lora.quant_storage
    if lora.load_in_4bit and storage is not None and cuda:
        compute = compute_storage(t.precision, True)
        if storage != compute:
            problems.append(f"lora.quant_storage={storage} with training.distributed=fsdp and lora.load_in_4bit: FSDP "
                            f"flattens the frozen 4-bit weights with the trainable ones, so they must be stored in the "
                            f"compute dtype ({compute}, training.precision={t.precision}); set lora.quant_storage="
                            f"{compute} or null (set to the compute dtype)")
    return problems


def _node_problems(t) -> List[str]:
    """training.nnodes against what SLURM says this job is (the environment of this process)."""
    value = t.nnodes
    if not (value == "auto" or (_is_int(value) and value >= 1)):
        return [f"training.nnodes={value!r} must be auto (the nodes of this SLURM job) or a number >= 1"]
    try:
        job = slurm.job_nodes()
    except slurm.SlurmEnvError as err:
        return [str(err)]  # names the SLURM variable (and the launcher key) at fault
    found = job.count if job else 1
    if _is_int(value) and value != found:
        where = (f"this SLURM job has {found} node(s) (SLURM_JOB_NUM_NODES)" if job else
                 "this process is not part of a SLURM job (SLURM_JOB_ID is not set): one node")
        return [f"training.nnodes={value}, but {where}: run it on {value} nodes (tunelab -m hydra/launcher=slurm "
                f"hydra.launcher.nodes={value} ...) or leave training.nnodes=auto"]
    if found > 1 and t.distributed == "none":
        return [f"training.distributed=none on a SLURM job of {found} nodes: every node would run the whole pipeline; "
                "set training.distributed=ddp (or fsdp) to train on all of them, or run on one node "
                "(hydra.launcher.nodes=1)"]
    return []


def check_distributed(cfg, cuda: Optional[int] = None) -> List[str]:
    """Every problem with the distributed keys (cuda: the CUDA device count, for tests)."""
    t = cfg.training
    cuda = cuda_count() if cuda is None and t.distributed != "none" else (cuda or 0)
    if t.distributed not in MODES:
        return [f"training.distributed={t.distributed!r} is not one of {', '.join(MODES)}"]
    problems = _nproc_problems(t, cuda) + _node_problems(t)
    storage = cfg.lora.quant_storage
    if storage is not None and storage not in QUANT_STORAGE:
        problems.append(f"lora.quant_storage={storage!r} is not one of {', '.join(QUANT_STORAGE)} or null")
    elif storage is not None and not cfg.lora.load_in_4bit:
        problems.append(f"lora.quant_storage={storage} has no effect without lora.load_in_4bit=true (QLoRA)")
    if t.distributed == "fsdp":
        problems += _fsdp_problems(cfg, cuda)
    return problems


def resolve(cfg, cuda: Optional[int] = None) -> None:
    """In place, after validation: nproc_per_node=auto becomes the device count, and QLoRA under fsdp
    gets quant_storage = the compute dtype, nnodes=auto the SLURM job's node count. The ranks and the
    config hash see these values."""
    t = cfg.training
    if t.distributed == "none":
        return
    cuda = cuda_count() if cuda is None else cuda
    t.nproc_per_node = local_world_size(t, cuda)
    t.nnodes = node_count(t)
    if t.distributed == "fsdp" and cfg.lora.load_in_4bit and cfg.lora.quant_storage is None:
        cfg.lora.quant_storage = compute_storage(t.precision, cuda > 0)
