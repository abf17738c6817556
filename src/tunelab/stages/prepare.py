"""prepare: read every source, validate every row, write ShareGPT JSONL train/eval splits.

Strict by default: any problem fails the stage and nothing is written. With
dataset.on_invalid=quarantine the invalid rows are dropped into prepare/quarantine.jsonl, each
with its reasons. Text the tokenizer would read as a special token is such a problem unless
dataset.special_tokens_in_text=escape, which keeps the row, trains that text as plain text and
counts it. The manifest records the dataset's content hash and how many rows went in and out.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import List, Optional

from tunelab.data import quarantine
from tunelab.data.formats import Conversation, DataError, write_jsonl
from tunelab.data.lengths import LengthMeter, percentiles
from tunelab.data.load import LoadedDataset, load_dataset
from tunelab.data.split import split_conversations, subsample, upsample
from tunelab.data.validate import split_overlap
from tunelab.paths import RunPaths

log = logging.getLogger(__name__)


def run(cfg, paths: RunPaths) -> dict:
    """The stage: token lengths are measured with the run's model tokenizer and chat template."""
    try:
        return prepare_dataset(cfg.dataset, paths, LengthMeter.from_config(cfg, paths))
    except DataError:
        # An older split must not survive a failed prepare: a later `stage=train` would train on data
        # that no longer matches the config.
        shutil.rmtree(paths.prepare_dir, ignore_errors=True)
        raise


def split_dataset(loaded: LoadedDataset, dataset_cfg):
    """The rows each side gets, as prepare writes them: (pool, train, evals, counts). The pool is
    what the split drew from (each source sampled to its rows/weight); train has weight > 1 repeats."""
    pool = [c for index, data in enumerate(loaded.sources)
            for c in subsample([c for c in loaded.train if c.origin == index], data.source, index, dataset_cfg.seed)]
    if loaded.evals is not None:
        train, evals = pool, loaded.evals
    else:
        train, evals = split_conversations(pool, dataset_cfg.eval_fraction, dataset_cfg.seed)
    overlap = split_overlap(train, evals)
    if overlap:  # the split is grouped and eval_path rows were checked for leakage: this is a bug
        raise RuntimeError(f"{overlap} eval row(s) share a prompt with the training split")
    distinct_train = len(train)
    train = upsample(train, [d.source for d in loaded.sources], dataset_cfg.seed)
    available_eval = len(evals)
    if dataset_cfg.max_eval_rows:
        evals = evals[: dataset_cfg.max_eval_rows]
    counts = {"rows_repeated": len(train) - distinct_train, "eval_rows_not_used": available_eval - len(evals)}
    return pool, train, evals, counts


def prepare_dataset(dataset_cfg, paths: RunPaths, meter: Optional[LengthMeter]) -> dict:
    loaded = load_dataset(dataset_cfg, meter)
    quarantine.enforce(loaded.problems, dataset_cfg.on_invalid)
    pool, train, evals, counts = split_dataset(loaded, dataset_cfg)
    records = quarantine.dropped_records(loaded.problems) + loaded.trimmed
    manifest = _manifest(dataset_cfg, loaded, pool, train, evals, counts, records, meter)
    _write_atomically(paths.prepare_dir, train, evals, manifest, records, paths.state_dir / "tmp")
    if loaded.escaped:
        log.warning("prepare: %d row(s) hold special-token text, trained as plain text "
                    "(dataset.special_tokens_in_text=escape), e.g. %s", len(loaded.escaped), loaded.escaped[0])
    if records:
        log.warning("prepare: %d row(s) dropped, %d trimmed: see %s", manifest["rows_quarantined"],
                    manifest["rows_trimmed"], paths.prepare_dir / "quarantine.jsonl")
    return manifest


def _manifest(dataset_cfg, loaded: LoadedDataset, pool, train, evals, counts, records, meter) -> dict:
    """Where every row went: rows_in = rows_out - rows_repeated + rows_quarantined + rows_not_sampled
    + eval_rows_not_used."""
    every = loaded.sources + ([loaded.held_out] if loaded.held_out else [])
    lengths = [loaded.token_lengths[c.source] for c in train + evals if c.source in loaded.token_lengths]
    return {
        "dataset": dataset_cfg.name,
        "dataset_sha256": loaded.sha256,
        "sources": [{"path": d.source.label, "format": d.source.format, "sha256": d.sha256,
                     "rows_read": d.rows_read, "rows_valid": len(d.conversations),
                     "rows_used": sum(c.origin == d.index for c in train + evals)}
                    for d in every],
        "rows_in": loaded.rows_in,
        "rows_out": len(train) + len(evals),
        "rows_quarantined": sum(r["action"] == "dropped" for r in records),
        "rows_trimmed": sum(r["action"] == "trimmed" for r in records),
        "rows_not_sampled": len(loaded.train) - len(pool),
        **counts,
        "train_rows": len(train),
        "eval_rows": len(evals),
        "split_overlap": 0,
        "on_invalid": dataset_cfg.on_invalid,
        "special_tokens_in_text": meter.special_text if meter else None,  # as the rows were checked
        "rows_special_text_escaped": len(loaded.escaped),
        "max_seq_length": meter.max_length if meter else None,
        "token_lengths": percentiles(lengths),
    }


def _write_atomically(out_dir: Path, train: List[Conversation], evals: List[Conversation], manifest: dict,
                      records: List[dict], scratch: Path) -> None:
    """Write into a temporary folder (in tunelab's own scratch space) and swap it in, so a failure
    leaves no half-written split."""
    scratch.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="prepare-", dir=scratch))
    try:
        write_jsonl(tmp / "train.jsonl", train)
        write_jsonl(tmp / "eval.jsonl", evals)
        if records:
            quarantine.write_records(tmp / "quarantine.jsonl", records)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
