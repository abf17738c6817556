"""Every artifact path of a run, derived in one place."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunPaths:
    run_dir: Path
    cache_dir: Path

    @classmethod
    def from_config(cls, paths_cfg) -> "RunPaths":
        return cls(Path(paths_cfg.run_dir).resolve(), Path(paths_cfg.cache_dir).resolve())

    # prepare
    @property
    def prepare_dir(self) -> Path:
        return self.run_dir / "prepare"

    @property
    def train_jsonl(self) -> Path:
        return self.prepare_dir / "train.jsonl"

    @property
    def eval_jsonl(self) -> Path:
        return self.prepare_dir / "eval.jsonl"

    @property
    def data_manifest(self) -> Path:
        return self.prepare_dir / "manifest.json"

    # train
    @property
    def train_dir(self) -> Path:
        return self.run_dir / "train"

    @property
    def adapter_dir(self) -> Path:
        return self.train_dir / "adapter"

    @property
    def loss_log(self) -> Path:
        return self.train_dir / "loss.jsonl"

    @property
    def train_tokenizer_dir(self) -> Path:
        """The tokenizer training used (with any special tokens it added): export reads this one."""
        return self.train_dir / "tokenizer"

    @property
    def template_contract(self) -> Path:
        return self.train_dir / "template_contract.json"

    @property
    def checkpoints_dir(self) -> Path:
        """Training checkpoints (resume): outside train/, which a stage that runs again replaces."""
        return self.run_dir / "checkpoints"

    @property
    def state_dir(self) -> Path:
        """tunelab's own records of this run directory: stage records, the run lock, ownership."""
        return self.run_dir / ".tunelab"

    # export
    @property
    def export_dir(self) -> Path:
        return self.run_dir / "export"

    @property
    def merged_dir(self) -> Path:
        return self.export_dir / "merged"

    def gguf(self, quant: str) -> Path:
        return self.export_dir / f"model.{quant}.gguf"

    @property
    def export_manifest(self) -> Path:
        return self.export_dir / "manifest.json"

    # evaluate
    @property
    def evaluate_dir(self) -> Path:
        return self.run_dir / "evaluate"

    @property
    def metrics_json(self) -> Path:
        return self.evaluate_dir / "metrics.json"

    @property
    def generations_jsonl(self) -> Path:
        return self.evaluate_dir / "generations.jsonl"

    @property
    def evaluation_summary(self) -> Path:
        return self.evaluate_dir / "summary.json"

    # shared cache
    def model_cache(self, name: str) -> Path:
        return self.cache_dir / "models" / name

    def base_gguf(self, model_name: str, quant: str) -> Path:
        return self.cache_dir / "base-gguf" / model_name / f"model.{quant}.gguf"

    @property
    def converter_root(self) -> Path:
        return self.cache_dir / "llama.cpp"
