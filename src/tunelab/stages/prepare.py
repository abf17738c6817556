"""prepare: read the dataset, validate every row, write ShareGPT JSONL train/eval splits."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import List, Tuple

from tunelab.config.identity import dataset_hash
from tunelab.data.formats import Conversation, read_dataset, write_jsonl
from tunelab.paths import RunPaths


def split_conversations(conversations: List[Conversation], fraction: float, seed: int
                        ) -> Tuple[List[Conversation], List[Conversation]]:
    """Deterministic split by a seeded hash of the prompt: equal prompts land on the same side."""
    def bucket(conv: Conversation) -> float:
        digest = hashlib.sha256(f"{seed}:{conv.prompt_key}".encode()).hexdigest()
        return int(digest[:12], 16) / float(16 ** 12)

    train = [c for c in conversations if bucket(c) >= fraction]
    evals = [c for c in conversations if bucket(c) < fraction]
    if not train or not evals:
        raise ValueError(f"dataset.eval_fraction={fraction} leaves an empty split of {len(conversations)} rows")
    return train, evals


def run(dataset_cfg, paths: RunPaths) -> dict:
    sources = [Path(dataset_cfg.path)] + ([Path(dataset_cfg.eval_path)] if dataset_cfg.eval_path else [])
    conversations = read_dataset(sources[0], dataset_cfg.format, dataset_cfg)
    if dataset_cfg.eval_path:
        train = conversations
        evals = read_dataset(sources[1], dataset_cfg.format, dataset_cfg)
    else:
        train, evals = split_conversations(conversations, dataset_cfg.eval_fraction, dataset_cfg.seed)
    overlap = {c.prompt_key for c in train} & {c.prompt_key for c in evals}
    if overlap:
        raise ValueError(f"{len(overlap)} prompt(s) appear in both the train and the eval data, e.g. "
                         f"{sorted(overlap)[0][:200]}: remove them from {sources[-1]}")
    if dataset_cfg.max_eval_rows:
        evals = evals[: dataset_cfg.max_eval_rows]
    manifest = {
        "dataset": dataset_cfg.name,
        "sources": [str(s) for s in sources],
        "dataset_sha256": dataset_hash(sources),
        "rows_in": len(conversations) + (len(evals) if dataset_cfg.eval_path else 0),
        "train_rows": len(train),
        "eval_rows": len(evals),
    }
    _write_atomically(paths.prepare_dir, train, evals, manifest)
    return manifest


def _write_atomically(out_dir: Path, train, evals, manifest) -> None:
    """Write into a temporary folder and swap it in, so a failure leaves no half-written split."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".prepare-", dir=out_dir.parent))
    write_jsonl(tmp / "train.jsonl", train)
    write_jsonl(tmp / "eval.jsonl", evals)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
