"""`tunelab reproduce <hash-prefix> [overrides] [--reuse]`: run a tracked experiment again from its
config hash and report its metrics side by side with the original run's.

The run is found by the prefix of its `tunelab.config_hash` tag; its exact resolved config is
read back from its `config.yaml` artifact. Only where things go comes from this machine (paths,
the tracking store: overrides such as `tracking.uri=...` or `paths.run_dir=...` pick them). The
dataset's bytes must match the recorded hash. Stages are not reused from the cache unless --reuse.
"""
from __future__ import annotations

from pathlib import Path

import argparse
import re
import sys
from typing import List, Optional, Tuple

from omegaconf import DictConfig, OmegaConf

# Metrics that measure the machine, not the result.
VOLATILE = ("train.runtime_s",)
VOLATILE_PREFIXES = ("seconds.",)  # each stage's wall time: how long, not what came out
VOLATILE_SUFFIXES = ("_tokens_per_s",)  # speed on a shared machine, not a result


class ReproduceError(RuntimeError):
    pass


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunelab reproduce", description=__doc__.split("\n\n")[0])
    parser.add_argument("hash_prefix", help="the start of a run's config hash (see `tunelab runs`)")
    parser.add_argument("overrides", nargs="*", help="where to look and write: tracking.uri=..., paths.run_dir=...")
    parser.add_argument("--reuse", action="store_true", help="reuse cached stages (default: compute everything)")
    return parser


def find_original(tracking_cfg, prefix: str) -> dict:
    from tunelab import tracking

    if not re.fullmatch(r"[0-9a-f]{4,64}", prefix):
        raise ReproduceError(f"{prefix!r} is not a config hash prefix: give at least 4 hex digits (see `tunelab runs`)")
    runs = [r for r in tracking.find_runs_by_hash(tracking_cfg, prefix) if r["tags"].get("tunelab.kind") != "sweep"]
    hashes = sorted({r["tags"]["tunelab.config_hash"] for r in runs})
    if not hashes:
        raise ReproduceError(f"no run with a config hash starting {prefix!r} in {tracking_cfg.uri} "
                             "(pick the store with tracking.uri=...)")
    if len(hashes) > 1:
        raise ReproduceError(f"{prefix!r} matches {len(hashes)} config hashes: {', '.join(h[:12] for h in hashes)}; "
                             "give more digits")
    finished = [r for r in runs if r["status"] == "FINISHED" and r["tags"].get("tunelab.stage", "all") == "all"]
    if not finished:
        raise ReproduceError(f"config hash {hashes[0][:12]} has no FINISHED full run to compare with")
    originals = [r for r in finished if "tunelab.reproduces" not in r["tags"]]
    return (originals or finished)[0]


def recompose(stored_yaml: str, here: DictConfig, overrides: List[str], reuse: bool) -> DictConfig:
    """The original's config, typed by the schema, with this machine's paths, store and cache."""
    from omegaconf.errors import OmegaConfBaseException

    from tunelab.config.schema import Config

    stored = OmegaConf.create(stored_yaml)
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), stored)
    except OmegaConfBaseException as err:
        raise ReproduceError(f"the run's config.yaml does not fit this tunelab's config schema ({err}): check out "
                             "the commit the run was made with (its tag tunelab.git_commit) and run this again")
    cfg.paths = here.paths
    if not any(o.lstrip("+").startswith("paths.run_dir=") for o in overrides):
        cfg.paths.run_dir = f"runs/reproduce/{cfg.name}"
    cfg.tracking = here.tracking
    cfg.tracking.experiment = stored.tracking.experiment
    cfg.cache = here.cache
    cfg.cache.enabled = reuse
    cfg.stage = "all"
    return cfg


def check_dataset(cfg: DictConfig, original: dict) -> str:
    from tunelab.data.sources import all_sources, dataset_sha256

    sources = [Path(s.path) for s in all_sources(cfg.dataset) if s.format != "hub"]
    recorded = original["tags"]["tunelab.dataset_sha256"]
    commit = original["tags"].get("tunelab.git_commit", "<commit>")
    how = (f"check out the dataset version of that run: `git checkout {commit} -- <file>.dvc && dvc checkout <file>` "
           f"for a DVC-tracked file (or `git checkout {commit} -- <file>` for one in git)")
    missing = [str(p) for p in sources if not p.exists()]
    if missing:
        raise ReproduceError(f"dataset file(s) {', '.join(missing)} of the original run are missing: {how}")
    actual = dataset_sha256(cfg.dataset)
    if actual != recorded:
        raise ReproduceError(f"the dataset bytes differ from the run's: {', '.join(map(str, sources))} hash to "
                             f"{actual[:12]}, the run recorded {recorded[:12]}: {how}")
    return actual


def compare(original: dict, reproduced: dict) -> Tuple[list, List[str]]:
    """Rows (name, original, reproduced, same) for every metric and the adapter; the names that differ."""
    rows, differ = [], []
    names = sorted(name for name in set(original["metrics"]) | set(reproduced["metrics"])
                   if name not in VOLATILE and not name.endswith(VOLATILE_SUFFIXES)
                   and not name.startswith(VOLATILE_PREFIXES))
    for name in names:
        a, b = original["metrics"].get(name), reproduced["metrics"].get(name)
        rows.append((name, a, b, a == b))
    adapter = [original["tags"].get("tunelab.adapter_sha256"), reproduced["tags"].get("tunelab.adapter_sha256")]
    rows.append(("adapter sha256", *(a[:12] if a else None for a in adapter), adapter[0] == adapter[1]))
    differ = [row[0] for row in rows if not row[3]]
    return rows, differ


def _report(original: dict, reproduced: dict) -> int:
    from rich.console import Console
    from rich.table import Table

    rows, differ = compare(original, reproduced)
    table = Table(title=f"run {original['run_id'][:8]} (original) vs {reproduced['run_id'][:8]} (reproduced)")
    for column in ("metric", "original", "reproduced", ""):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for name, a, b, same in rows:
        table.add_row(name, str(a), str(b), "same" if same else "DIFFERS", style=None if same else "bold red")
    console = Console()
    console.print(table)
    if differ:
        console.print(f"[bold red]{len(differ)} of {len(rows)} values differ[/]: {', '.join(differ[:10])}")
        return 1
    console.print(f"[bold green]reproduced: all {len(rows) - 1} metrics and the adapter weights are identical[/]")
    return 0


def reproduce(prefix: str, overrides: List[str], reuse: bool = False) -> Tuple[dict, Optional[dict]]:
    from rich.console import Console

    from tunelab import pipeline, tracking
    from tunelab.config.compose import compose
    from tunelab.config.distributed import resolve as resolve_distributed
    from tunelab.config.identity import config_hash, identity_dict
    from tunelab.provenance import git_state

    here = compose(overrides)
    original = find_original(here.tracking, prefix)
    stored_yaml = tracking.read_artifact_text(here.tracking, original["run_id"], "config.yaml")
    cfg = recompose(stored_yaml, here, overrides, reuse)
    recorded_hash = original["tags"]["tunelab.config_hash"]
    console = Console(stderr=True)
    console.print(f"reproducing run {original['run_id']} ({original['name']}), config hash {recorded_hash[:12]}")
    resolve_distributed(cfg)  # as the run did before hashing: nproc_per_node=auto -> the device count
    new_hash = config_hash(cfg, check_dataset(cfg, original))
    if new_hash != recorded_hash:
        changed = set(_flat(identity_dict(cfg)).items()) ^ set(_flat(identity_dict(OmegaConf.create(stored_yaml))).items())
        console.print(f"[yellow]warning[/]: the recomposed config hashes to {new_hash[:12]}, not {recorded_hash[:12]} "
                      f"(this tunelab's schema differs: {', '.join(sorted({k for k, _ in changed})) or '?'})")
    commit, now = original["tags"].get("tunelab.git_commit"), git_state()
    if commit and commit != now["commit"]:
        console.print(f"[yellow]warning[/]: the original ran at commit {commit[:12]}, this is {now['commit'][:12]}: "
                      f"for the same code, `git checkout {commit[:12]}` first")
    results = pipeline.run(cfg, extra_tags={"tunelab.reproduces": original["run_id"]})
    reproduced = tracking.get_run(cfg.tracking, results["mlflow_run_id"]) if results.get("mlflow_run_id") else None
    return original, reproduced


def _flat(data: dict) -> dict:
    from tunelab.tracking import flatten

    return {k: str(v) for k, v in flatten(data).items()}


def main(argv: List[str]) -> int:
    from rich.console import Console

    args = _parser().parse_args(argv)
    try:
        original, reproduced = reproduce(args.hash_prefix, args.overrides, args.reuse)
    except ReproduceError as err:
        Console(stderr=True).print(f"[bold red]tunelab reproduce[/]: {err}", highlight=False)
        return 2
    if reproduced is None:
        print("tracking is off: nothing to compare with", file=sys.stderr)
        return 1
    return _report(original, reproduced)
