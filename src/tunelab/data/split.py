"""Mixing several sources (rows / weight) and the deterministic, grouped train/eval split."""
from __future__ import annotations

import hashlib
import math
import random
from typing import List, Sequence, Tuple

from tunelab.data.formats import Conversation, DataError
from tunelab.data.sources import Source
from tunelab.data.validate import prompt_group


def _rng(seed: int, index: int) -> random.Random:
    return random.Random(f"tunelab:{seed}:{index}")  # str seeds are stable across Python runs


def subsample(conversations: List[Conversation], source: Source, index: int, seed: int) -> List[Conversation]:
    """The rows a source contributes: `rows` of them, or `weight` (<= 1) of them, a seeded sample in file order."""
    if source.rows is not None:
        if source.rows > len(conversations):
            raise DataError([f"{source.label}: dataset.sources[{index}].rows={source.rows} but the source has only "
                             f"{len(conversations)} valid rows; lower rows or use weight"])
        keep = source.rows
    elif source.weight is not None and source.weight < 1:
        keep = round(source.weight * len(conversations))
    else:
        return list(conversations)
    chosen = set(_rng(seed, index).sample(range(len(conversations)), keep))
    return [c for i, c in enumerate(conversations) if i in chosen]


def upsample(train: List[Conversation], sources: Sequence[Source], seed: int) -> List[Conversation]:
    """Training rows of a source with weight > 1 repeat: floor(weight) times, plus a seeded sample for the rest."""
    out = list(train)
    for index, source in enumerate(sources):
        if source.weight is None or source.weight <= 1:
            continue
        own = [c for c in train if c.origin == index]
        whole, fraction = int(math.floor(source.weight)), source.weight - math.floor(source.weight)
        out += own * (whole - 1)
        out += _rng(seed, index).sample(own, round(fraction * len(own)))
    return out


def split_conversations(conversations: List[Conversation], fraction: float, seed: int
                        ) -> Tuple[List[Conversation], List[Conversation]]:
    """Deterministic split by a seeded hash of the prompt group: near-equal prompts land on one side."""
    def bucket(conv: Conversation) -> float:
        digest = hashlib.sha256(f"{seed}:{prompt_group(conv)}".encode()).hexdigest()
        return int(digest[:12], 16) / float(16 ** 12)

    train = [c for c in conversations if bucket(c) >= fraction]
    evals = [c for c in conversations if bucket(c) < fraction]
    if not train or not evals:
        raise DataError([f"dataset.eval_fraction={fraction} leaves an empty split of {len(conversations)} rows; "
                         "change eval_fraction or give an eval_path"])
    return train, evals
