"""Mixing several sources (rows / weight) and the deterministic, grouped train/eval split."""
from __future__ import annotations

import hashlib
import math
import random
from typing import Dict, List, Sequence, Tuple

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


def eval_target(fraction: float, rows: int) -> int:
    """How many eval rows eval_fraction asks for: fraction * rows, rounded half up."""
    return int(math.floor(fraction * rows + 0.5))


def split_conversations(conversations: List[Conversation], fraction: float, seed: int
                        ) -> Tuple[List[Conversation], List[Conversation]]:
    """Deterministic, grouped split: round(fraction * rows) eval rows (as near as whole groups allow).

    Rows whose prompts are near-equal (one prompt group) land on one side. Groups are taken in the
    order of a seeded hash of the group; a group goes to eval when that brings the eval count nearer
    the target. Every row keeps its file order on its side."""
    groups: Dict[str, List[int]] = {}
    for index, conv in enumerate(conversations):
        groups.setdefault(prompt_group(conv), []).append(index)

    def rank(key: str) -> str:
        return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()

    target, chosen = eval_target(fraction, len(conversations)), set()
    for key in sorted(groups, key=rank):
        size = len(groups[key])
        if abs(len(chosen) + size - target) < abs(len(chosen) - target):
            chosen.update(groups[key])
    train = [c for i, c in enumerate(conversations) if i not in chosen]
    evals = [c for i, c in enumerate(conversations) if i in chosen]
    if not train or not evals:
        raise DataError([f"dataset.eval_fraction={fraction} of {len(conversations)} rows "
                         f"({len(groups)} prompt groups) leaves an empty split; raise or lower "
                         "eval_fraction or give an eval_path"])
    return train, evals
