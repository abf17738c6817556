"""Check a dataset file against its `.dvc` record before trusting it.

`dvc checkout` / `dvc pull` do not re-hash what they place in the workspace: a corrupted cache or
an edited file with a stale `.dvc` goes through silently. tunelab hashes the bytes it actually
parses and refuses them when `<file>.dvc` records a different md5 (DVC 3 records the plain md5 of
a file's bytes). Folders tracked with `.dvc` (md5 ending in `.dir`) are not checked here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import yaml

from tunelab.data.formats import Problem


def dvc_record(path: Path) -> Optional[str]:
    """The md5 that `<path>.dvc` records for `path`, or None when there is no such record."""
    record = path.with_name(path.name + ".dvc")
    if not record.is_file():
        return None
    outs = (yaml.safe_load(record.read_text()) or {}).get("outs") or []
    for out in outs:
        if Path(str(out.get("path", ""))).name == path.name and out.get("md5"):
            return str(out["md5"])
    return None


def check_dvc_record(path: Path, md5: str) -> Optional[Problem]:
    recorded = dvc_record(path)
    if recorded is None or recorded.endswith(".dir") or recorded == md5:
        return None
    return Problem(str(path), "hash mismatch",
                   f"the bytes read have md5 {md5} but {path.name}.dvc records {recorded}: the file is not the "
                   f"version DVC tracks. Run `dvc checkout {path}` (or `dvc pull`) to restore it, or "
                   f"`dvc add {path}` if the change is intended.", fatal=True)
