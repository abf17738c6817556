"""One rank of a distributed train stage: `python -m tunelab.stages.train_rank <config.yaml> <events.jsonl>`.

Started by tunelab.training.launch with torchrun's environment; never by hand. It reads the config
the Hydra process composed, validated and resolved (typed by the schema again, never re-composed),
and runs the train stage's training in this process. Rank 0 writes the stage's files and appends what
it reports to events.jsonl (the launching process forwards it to the MLflow run it owns); the other
ranks write nothing of their own (the Trainer's checkpoint writes its rng_state_<rank>.pth).

Exit codes: 0 trained; 2 the input's fault (the error is also written to rank-<r>.error.json, which
the launcher raises again as the same error); 128 + signal after SIGTERM/SIGINT (a checkpoint was
saved at the end of the step); 1 anything else, with its traceback in this rank's log.
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from tunelab import runstate
from tunelab.config.errors import ConfigError
from tunelab.config.schema import Config
from tunelab.paths import RunPaths
from tunelab.stages import train
from tunelab.templates.chat import TemplateError
from tunelab.training import launch


class EventReporter:
    """The train stage's reporter on rank 0: each call one line of events.jsonl (flushed at once)."""

    def __init__(self, path: Path, run_id: Optional[str]):
        self.path, self.run_id = path, run_id

    def _write(self, event: dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(event) + "\n")

    def log_metrics(self, metrics: dict, step: int) -> None:
        self._write({"kind": "metrics", "metrics": metrics, "step": int(step)})

    def set_tags(self, tags: dict) -> None:
        self._write({"kind": "tags", "tags": {k: str(v) for k, v in tags.items()}})


class Silent(EventReporter):
    """Ranks other than 0 report nothing (rank 0 reports for the world); they know the run id."""

    def _write(self, event: dict) -> None:
        pass


def load_config(path: Path):
    """The resolved config, typed by the schema (as compose gave it to the Hydra process)."""
    return OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(path))


def _report_input_error(paths: RunPaths, r: int, err: Exception) -> None:
    record = {"type": type(err).__name__, "message": str(err), "problems": getattr(err, "problems", None)}
    launch.error_path(paths, r).write_text(json.dumps(record))


def main(argv) -> int:
    config_file, events_file = Path(argv[0]), Path(argv[1])
    cfg = load_config(config_file)
    r, paths = launch.rank(), RunPaths.from_config(cfg.paths)
    run_id = os.environ.get("TUNELAB_RUN_ID") or None
    reporter = (EventReporter if r == 0 else Silent)(events_file, run_id)
    try:
        with runstate.sigterm_raises():
            train.train_here(cfg, paths, reporter)
    except KeyboardInterrupt as interrupt:
        print(f"rank {r}: stopped ({type(interrupt).__name__})", file=sys.stderr, flush=True)
        return runstate.exit_code(interrupt)
    except (ConfigError, TemplateError) as err:
        _report_input_error(paths, r, err)
        print(f"rank {r}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        return 2
    except Exception:  # noqa: BLE001 - its traceback is this rank's log, which the launcher names
        traceback.print_exc()
        return 1
    print(f"rank {r}: done", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
