"""Readers: one per input format, each -> canonical Conversations plus every problem found.

A reader never stops at the first bad row: it reports each one with file:line (a `datasets`
folder: folder[index]) and a named reason, and returns the rows that are fine. File-level problems
(bytes that are not UTF-8, a missing CSV column) are fatal: no row of that file is trusted.
The bytes are read once; their hashes are what the manifest records and what .dvc files are
checked against, so the data parsed is the data identified.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from tunelab.config.identity import folder_sha256
from tunelab.data import rows as parse
from tunelab.data.dvc import check_dvc_record
from tunelab.data.formats import Conversation, Problem
from tunelab.data.sources import Source, hub_digest, require_input_path
from tunelab.data.validate import check_structure


@dataclass
class SourceData:
    source: Source
    index: int
    sha256: str
    conversations: List[Conversation] = field(default_factory=list)
    problems: List[Problem] = field(default_factory=list)
    rows_read: int = 0

    def add(self, messages, where: str, raw: Optional[str], problems: List[Problem]) -> None:
        """One input row: kept if it parses and is well-formed, else its problems are recorded."""
        self.rows_read += 1
        if messages is not None and not problems:
            problems = check_structure(messages, where)
        for problem in problems:
            problem.raw = raw
        self.problems += problems
        if not problems:
            self.conversations.append(Conversation(messages, where, raw, self.index))


def decode_lines(data: bytes, label: str) -> Tuple[List[str], List[Problem]]:
    """UTF-8 (a BOM is fine) line by line, so every undecodable line is named, not only the first."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return [], [Problem(f"{label}:1", "not UTF-8", "the file is UTF-16 (it starts with a UTF-16 byte-order "
                            "mark); re-save it as UTF-8", fatal=True)]
    data = data[3:] if data.startswith(b"\xef\xbb\xbf") else data
    lines, problems = [], []
    for number, chunk in enumerate(data.split(b"\n"), start=1):
        try:
            lines.append(chunk.decode("utf-8"))
        except UnicodeDecodeError as err:
            lines.append("")
            problems.append(Problem(f"{label}:{number}", "not UTF-8",
                                    f"byte 0x{chunk[err.start]:02x} at column {err.start + 1}; the file must be "
                                    "UTF-8 (with or without BOM): convert it, e.g. `iconv -f latin1 -t utf-8`",
                                    raw=chunk.decode("utf-8", errors="replace")))
    return lines, problems


def read_source(source: Source, index: int = 0) -> SourceData:
    if source.format == "hub":
        return _read_hub(source, index)
    require_input_path(source)  # before any read: a FIFO or /dev/zero would block or never end
    path = Path(source.path)
    if source.format == "hf_disk":
        data = SourceData(source, index, folder_sha256(path))
        _read_rows(data, _load_from_disk(path, source.split), str(path))
        return data
    raw = path.read_bytes()
    data = SourceData(source, index, hashlib.sha256(raw).hexdigest())
    mismatch = check_dvc_record(path, hashlib.md5(raw, usedforsecurity=False).hexdigest())
    if mismatch:
        data.problems.append(mismatch)
        return data
    lines, problems = decode_lines(raw, str(path))
    if problems and source.format == "csv":
        for problem in problems:
            problem.fatal = True
        data.problems += problems
        return data
    data.problems += problems
    data.rows_read += len(problems)
    (_read_csv if source.format == "csv" else _read_json)(data, lines, path)
    return data


def _read_csv(data: SourceData, lines: List[str], path: Path) -> None:
    source = data.source
    reader = csv.DictReader(io.StringIO("\n".join(lines), newline=""))
    try:
        header = reader.fieldnames or []
        missing = parse.missing_columns(header, source)
        if missing:
            data.problems.append(Problem(f"{path}:1", "missing CSV column", f"{missing}; the header has {header}. "
                                         "Fix dataset.user_template / system_prompt / answer_column or the file.",
                                         fatal=True))
            return
        previous = 1
        for row in reader:
            where, raw = f"{path}:{reader.line_num}", "\n".join(lines[previous:reader.line_num])
            previous = reader.line_num
            if None in row or any(value is None for value in row.values()):
                width = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None) or [])
                data.add(None, where, raw, [Problem(where, "malformed CSV",
                                                    f"the row has {width} fields, the header has {len(header)}")])
                continue
            messages, problems = parse.mapped_messages(row, where, source)
            data.add(messages, where, raw, problems)
    except csv.Error as err:
        data.problems.append(Problem(f"{path}:{reader.line_num}", "malformed CSV", str(err), fatal=True))


def _parse_object(obj, where: str, source: Source, shape: Optional[str] = None):
    shape = shape or source.format
    if shape == "sharegpt":
        return parse.sharegpt_messages(obj, where)
    if shape == "openai":
        return parse.openai_messages(obj, where)
    if shape == "alpaca":
        return parse.alpaca_messages(obj, where, source.system_prompt)
    return parse.mapped_messages(obj, where, source)


def _read_json(data: SourceData, lines: List[str], path: Path) -> None:
    """JSONL (one object a line), or a JSON array of objects (Alpaca's own files are arrays)."""
    first = next((line.strip() for line in lines if line.strip()), "")
    items = _array_items("\n".join(lines), path) if first.startswith("[") else _jsonl_items(lines, path)
    for where, obj, raw, problems in items:
        if problems:
            data.add(None, where, raw, problems)
        else:
            messages, problems = _parse_object(obj, where, data.source)
            data.add(messages, where, raw, problems)


def _jsonl_items(lines: List[str], path: Path) -> Iterator[tuple]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            yield where, json.loads(line), line, []
        except json.JSONDecodeError as err:
            yield where, None, line, [Problem(where, "malformed JSON", f"({err.msg} at column {err.colno})")]


def _array_items(text: str, path: Path) -> Iterator[tuple]:
    """Each element of a top-level JSON array with the line it starts on."""
    decoder, position = json.JSONDecoder(), text.index("[") + 1
    while True:
        while position < len(text) and text[position] in " \t\r\n,":
            position += 1
        if position >= len(text) or text[position] == "]":
            return
        line = text.count("\n", 0, position) + 1
        try:
            obj, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as err:
            yield (f"{path}:{err.lineno}", None, text[position:position + 500],
                   [Problem(f"{path}:{err.lineno}", "malformed JSON",
                            f"({err.msg} at column {err.colno}); the rest of the array cannot be read", fatal=True)])
            return
        yield f"{path}:{line}", obj, text[position:end], []
        position = end


def _read_rows(data: SourceData, rows, label: str) -> None:
    """Rows of a `datasets` Dataset: conversations, messages, Alpaca, or flat columns mapped."""
    columns = list(getattr(rows, "column_names", None) or [])
    shape = parse.row_shape(dict.fromkeys(columns))
    if shape == "mapped":
        missing = parse.missing_columns(columns, data.source)
        if missing:
            data.problems.append(Problem(label, "missing CSV column", f"{missing}; the dataset has columns "
                                         f"{columns}. Fix the source's user_template / answer_column.", fatal=True))
            return
    for number, row in enumerate(rows):
        where = f"{label}[{number}]"
        messages, problems = _parse_object(row, where, data.source, shape)
        data.add(messages, where, json.dumps(row, ensure_ascii=False, default=str), problems)


def _load_from_disk(path: Path, split: str):
    from datasets import DatasetDict, load_from_disk

    loaded = load_from_disk(str(path))
    if isinstance(loaded, DatasetDict):
        if split not in loaded:
            raise FileNotFoundError(f"{path}: no split {split!r}; it has {list(loaded)} (set the source's split)")
        return loaded[split]
    return loaded


def _read_hub(source: Source, index: int) -> SourceData:
    """A hub dataset at a pinned revision (needs the network, or the local datasets cache)."""
    from datasets import load_dataset

    rows = load_dataset(source.path, revision=source.revision, split=source.split)
    data = SourceData(source, index, hub_digest(source))
    _read_rows(data, rows, source.label)
    return data
