"""The invalid-row policy: fail with every problem (default), or drop rows into a quarantine file.

Nothing is dropped without a record: each dropped row is one line of prepare/quarantine.jsonl with
where it came from, every reason and the row as read. Rows shortened by trim_history are recorded
there too (action "trimmed"). Whole-file problems are never quarantined: they always fail.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

from tunelab.data.formats import DataError, Problem

POLICIES = ("fail", "quarantine")
HINT = ("Nothing was written. Fix the rows, or set dataset.on_invalid=quarantine to drop them into "
        "prepare/quarantine.jsonl.")


def enforce(problems: List[Problem], on_invalid: str) -> None:
    """Raise DataError naming every problem unless the policy lets these rows be dropped."""
    fatal = [p for p in problems if p.fatal]
    if fatal:
        raise DataError(fatal if on_invalid == "quarantine" else problems,
                        "Nothing was written: problems with whole files cannot be quarantined.")
    if problems and on_invalid != "quarantine":
        raise DataError(problems, HINT)


def dropped_records(problems: List[Problem]) -> List[dict]:
    """One record per dropped row (a row with several problems lists every reason)."""
    by_row: Dict[str, dict] = {}
    for problem in problems:
        record = by_row.setdefault(problem.where, {"where": problem.where, "action": "dropped", "reasons": [],
                                                   "problems": [], "row": problem.raw})
        record["reasons"].append(problem.reason)
        record["problems"].append(str(problem))
    return list(by_row.values())


def trimmed_record(where: str, raw, exchanges: int) -> dict:
    return {"where": where, "action": "trimmed", "reasons": ["over-long"],
            "problems": [f"{where}: over-long; dropped the {exchanges} oldest exchange(s) to fit"], "row": raw}


def write_records(path: Path, records: List[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
