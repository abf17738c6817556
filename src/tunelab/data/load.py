"""Read every source of a dataset config and run every check in one pass.

The result holds the rows that passed, every problem found (each naming file:line and a reason)
and what trim_history shortened; prepare and `tunelab data check` both start here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from tunelab.config.identity import combine_digests
from tunelab.data.formats import Conversation, Problem
from tunelab.data.lengths import LengthMeter
from tunelab.data.quarantine import trimmed_record
from tunelab.data.readers import SourceData, read_source
from tunelab.data.sources import eval_source, training_sources
from tunelab.data.validate import find_duplicates, find_leakage
from tunelab.templates.special_text import describe


@dataclass
class LoadedDataset:
    sources: List[SourceData]
    held_out: Optional[SourceData]
    train: List[Conversation]
    evals: Optional[List[Conversation]]  # the rows of eval_path, when there is one
    sha256: str
    problems: List[Problem] = field(default_factory=list)
    trimmed: List[dict] = field(default_factory=list)
    token_lengths: Dict[str, int] = field(default_factory=dict)  # by conversation source
    escaped: List[str] = field(default_factory=list)  # rows whose special-token text trains as plain text

    @property
    def rows_in(self) -> int:
        return sum(d.rows_read for d in self.sources + ([self.held_out] if self.held_out else []))


def _where_order(problem: Problem):
    """file:line order for reports: by file, then by line or row number as a number."""
    match = re.match(r"^(.*?)(?::(\d+)|\[(\d+)\])?$", problem.where)
    return match.group(1), int(match.group(2) or match.group(3) or 0)


def load_dataset(dataset_cfg, meter: Optional[LengthMeter]) -> LoadedDataset:
    """Every source read, hashed and checked; `meter` None skips the length check (reader tests)."""
    sources = training_sources(dataset_cfg)
    datas = [read_source(source, index) for index, source in enumerate(sources)]
    held_source = eval_source(dataset_cfg)
    held = read_source(held_source, len(sources)) if held_source else None
    every = datas + ([held] if held else [])
    loaded = LoadedDataset(datas, held, [c for d in datas for c in d.conversations],
                           held.conversations if held else None, combine_digests(d.sha256 for d in every))
    problems = [p for d in every for p in d.problems]
    problems += [Problem(d.source.label, "no rows", "- the source is empty", fatal=True)
                 for d in every if not d.rows_read and not d.problems]
    pinned = getattr(dataset_cfg, "sha256", None)
    if pinned and pinned != loaded.sha256:
        problems.append(Problem(f"dataset {dataset_cfg.name}", "hash mismatch",
                                f"- the content hash is {loaded.sha256} but dataset.sha256 pins {pinned}: the data "
                                "changed. Restore the pinned version (e.g. `dvc checkout`) or update the pin.",
                                fatal=True))
    flagged = find_duplicates(loaded.train)
    if held:
        flagged += find_duplicates(loaded.evals) + find_leakage(loaded.train, loaded.evals)
    _drop(loaded, flagged)
    if meter is not None:
        _check_special_text(loaded, meter)
        _fit_lengths(loaded, meter, bool(getattr(dataset_cfg, "trim_history", False)))
    loaded.problems = sorted(problems + [p for _, p in flagged] + loaded.problems, key=_where_order)
    return loaded


def _drop(loaded: LoadedDataset, flagged) -> None:
    bad = {id(conv) for conv, _ in flagged}
    for conv, problem in flagged:
        problem.raw = conv.raw
    loaded.train = [c for c in loaded.train if id(c) not in bad]
    if loaded.evals is not None:
        loaded.evals = [c for c in loaded.evals if id(c) not in bad]


def _check_special_text(loaded: LoadedDataset, meter: LengthMeter) -> None:
    """Text the tokenizer would read as a control token: a row problem (quarantine drops the row
    like any other) unless dataset.special_tokens_in_text=escape, which keeps and counts it."""
    def check(conversations: List[Conversation]) -> List[Conversation]:
        kept = []
        for conv in conversations:
            findings = meter.special_text_in(conv.messages)
            if findings and meter.special_text == "escape":
                loaded.escaped.append(conv.source)
            elif findings:
                loaded.problems.append(Problem(conv.source, "special token in text", f"- {describe(findings)}",
                                              raw=conv.raw))
                continue
            kept.append(conv)
        return kept

    loaded.train = check(loaded.train)
    if loaded.evals is not None:
        loaded.evals = check(loaded.evals)


def _fit_lengths(loaded: LoadedDataset, meter: LengthMeter, trim_history: bool) -> None:
    def fit(conversations: List[Conversation]) -> List[Conversation]:
        kept = []
        for conv in conversations:
            fitted, problem, dropped, length = meter.fit(conv, trim_history)
            if length:
                loaded.token_lengths[conv.source] = length
            if problem:
                problem.raw = conv.raw
                loaded.problems.append(problem)
                continue
            if dropped:
                loaded.trimmed.append(trimmed_record(conv.source, conv.raw, dropped))
            kept.append(fitted)
        return kept

    loaded.train = fit(loaded.train)
    if loaded.evals is not None:
        loaded.evals = fit(loaded.evals)
