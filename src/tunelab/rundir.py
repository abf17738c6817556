"""One run directory, one tunelab: the run lock, and what in the directory tunelab wrote.

A run holds `<run_dir>/.tunelab/lock` (an flock, released by the kernel however the process ends)
for its whole length; a second tunelab on the same directory exits at once naming the holder. What
tunelab wrote is known from its own records (`.tunelab/stages/<stage>.json`, see tunelab.records):
a run directory that holds anything else is refused before anything is written, so tunelab never
deletes or overwrites a file of the user's.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from pathlib import Path
from typing import List, Optional

from tunelab import runstate
from tunelab.paths import RunPaths
from tunelab.records import STAGE_DIRS, StageRecord

# Written by tunelab itself (besides the stage folders, whose records list their files).
OWN_FILES = ("config.yaml", "identity.json")
# Written by Hydra for this run (its config and log), which tunelab leaves alone.
HYDRA_DIRS = ("hydra", ".hydra")
SHOWN = 10  # how many foreign files an error names
SCAN_LIMIT = 10_000  # how many are looked for at most (a run_dir pointed at a home folder stays quick)
# Where tunelab writes: a file of the user's there is refused even with paths.foreign_files=keep.
IN_THE_WAY = (*STAGE_DIRS, *OWN_FILES, "checkpoints")


class RunDirError(RuntimeError):
    """The run directory cannot be used as it is (exit 2): in use, or holding files of the user's."""


def describe_holder(holder: dict) -> str:
    started = holder.get("started_at") or "?"
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {started}"
            f" ({holder.get('command', '?')})")


class RunLock:
    """`<run_dir>/.tunelab/lock`: exclusive for the whole run; the file says who holds it."""

    def __init__(self, paths: RunPaths):
        self.path = paths.state_dir / "lock"
        self.handle = None
        self.took_over: Optional[dict] = None  # the holder of a stale lock, when one was taken over

    def held_by_another(self) -> Optional[dict]:
        """Who holds the lock now, without creating anything (None: nobody, or no lock file)."""
        if not self.path.is_file():
            return None
        with open(self.path, "rb+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return _read_holder(self.path) or {"pid": "?"}
            fcntl.flock(handle, fcntl.LOCK_UN)
        return None

    def acquire(self, command: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+b")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise RunDirError(f"{self.path.parent.parent} is in use by another tunelab: "
                              f"{describe_holder(_read_holder(self.path) or {})}. Wait for it to end, or give this "
                              f"run its own directory (paths.run_dir=...).") from None
        previous = _read_holder(self.path)
        if previous and previous.get("pid") != str(os.getpid()):
            self.took_over = previous  # the kernel released its flock: that process is gone
        me = runstate.this_process()
        holder = {**me, "started_at": time.strftime("%Y-%m-%d %H:%M:%S"), "command": command}
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(holder).encode())
        handle.flush()
        os.fsync(handle.fileno())
        self.handle = handle

    def release(self) -> None:
        """Empty the file, then unlock (never unlink: a waiter could lock the unlinked file)."""
        if self.handle is None:
            return
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.flush()
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()
        self.handle = None


def _read_holder(path: Path) -> Optional[dict]:
    try:
        text = path.read_text()
        return json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None


def _files_under(folder: Path, limit: int) -> List[Path]:
    found = []
    for path in folder.rglob("*"):  # not sorted: a huge folder (paths.run_dir=~) stops at the limit
        if path.is_symlink() or not path.is_dir():
            found.append(path)
            if len(found) >= limit:
                break
    return sorted(found)


def foreign_files(paths: RunPaths, only_in_the_way: bool = False, limit: int = SCAN_LIMIT) -> List[str]:
    """Files of the run directory that tunelab did not write (relative paths), per its records; with
    only_in_the_way, just those where tunelab writes. At most `limit` of them are looked for."""
    run_dir = paths.run_dir
    if not run_dir.is_dir():
        return []
    owned_dir = paths.state_dir.is_dir()  # tunelab made this directory its own
    foreign: List[str] = []
    for entry in sorted(run_dir.iterdir()):
        name = entry.name
        if len(foreign) >= limit or (only_in_the_way and name not in IN_THE_WAY):
            continue
        if name in HYDRA_DIRS or name == paths.state_dir.name or (name.endswith(".log") and entry.is_file()):
            continue
        if owned_dir and name in OWN_FILES and entry.is_file():
            continue
        if owned_dir and entry == paths.checkpoints_dir and entry.is_dir():
            continue  # written by tunelab's trainer; each checkpoint says whether it is complete
        if owned_dir and name in STAGE_DIRS and entry.is_dir():
            foreign += StageRecord(paths, name).unlisted_files()
            continue
        if entry.is_dir() and not entry.is_symlink():
            foreign += [str(p.relative_to(run_dir)) for p in _files_under(entry, limit - len(foreign))]
        else:
            foreign.append(name)
    return foreign[:limit]


def check_ownership(paths: RunPaths, allow_foreign: bool) -> None:
    """Refuse a run directory holding files tunelab did not write. With allow_foreign they may stay,
    as long as none of them is where tunelab writes (its stage folders and own files)."""
    if paths.run_dir.exists() and not paths.run_dir.is_dir():
        raise RunDirError(f"paths.run_dir={paths.run_dir} is a file, not a folder: choose a folder for the run")
    foreign = foreign_files(paths, only_in_the_way=allow_foreign, limit=SCAN_LIMIT)
    if not foreign:
        return
    count = f"at least {len(foreign)}" if len(foreign) >= SCAN_LIMIT else str(len(foreign))
    shown = "\n  ".join(foreign[:SHOWN]) + (f"\n  ... and {len(foreign) - SHOWN} more" if len(foreign) > SHOWN else "")
    advice = ("move them out of tunelab's folders (prepare/ train/ export/ evaluate/ checkpoints/, config.yaml, "
              "identity.json)" if allow_foreign else
              "choose an empty or new folder (paths.run_dir=...), or let tunelab use this one with "
              "paths.foreign_files=keep (it still never touches them)")
    raise RunDirError(f"{paths.run_dir} holds {count} file(s) tunelab did not write, which it would not "
                      f"delete or overwrite:\n  {shown}\nTo go on, {advice}.")


def clean_tmp(paths: RunPaths) -> None:
    """tunelab's scratch space in the run directory: whatever a killed run left there is its own."""
    tmp = paths.state_dir / "tmp"
    if tmp.exists():
        shutil.rmtree(tmp)


def claim(paths: RunPaths, allow_foreign: bool, command: str) -> RunLock:
    """Lock the run directory for this process (after checking it holds nothing of the user's)."""
    lock = RunLock(paths)
    holder = lock.held_by_another()  # first: a busy directory is "in use", whatever it holds now
    if holder is not None:
        raise RunDirError(f"{paths.run_dir} is in use by another tunelab: {describe_holder(holder)}. Wait for it "
                          f"to end, or give this run its own directory (paths.run_dir=...).")
    check_ownership(paths, allow_foreign)
    lock.acquire(command)
    clean_tmp(paths)
    return lock
