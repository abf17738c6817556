"""The entrypoint: `tunelab [stage=<name>] [experiment=<name>] [group=option ...] [key=value ...]`.

A Hydra app (so multirun, sweepers and launchers work); `tunelab --help` lists the groups.
Plain subcommands (`tunelab <name> ...`) live in tunelab.commands.<name>, each with main(argv).
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Optional

import hydra
from omegaconf import DictConfig

from tunelab.config.compose import compose, conf_dirs, package_conf, project_conf
from tunelab.config.errors import ConfigError
from tunelab.config import overrides as override_checks
from tunelab.config.schema import register_configs

# Exit codes: 2 a problem with the input (config, data, template, export refused: the message says
# which); 3 the run ended, but every fine-tuned GGUF is BROKEN: nothing to ship (README, "Exit codes").
NOTHING_SHIPS = 3


def _job_context(cfg: DictConfig):
    """Tags naming the overrides of this run; in a sweep, the job's own run_dir and parent run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from tunelab import sweep

    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    tags = {"tunelab.overrides": " ".join(overrides) or "(none)"}
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return False, None, tags
    tags["tunelab.sweep_job"] = str(hydra_cfg.job.num)
    if not any(o.lstrip("+").startswith("paths.run_dir=") for o in overrides):
        cfg.paths.run_dir = hydra_cfg.runtime.output_dir  # jobs must not share files
    return True, sweep.parent_run_id(hydra_cfg.runtime.output_dir), tags


def print_error(err: Exception) -> None:
    from rich.console import Console
    from rich.text import Text

    # Text, not markup: messages quote rows ("[system]" would be read as a style); soft_wrap: no
    # line breaks inside a long file:line, so every message stays one greppable line.
    message = Text.assemble((f"tunelab: {type(err).__name__}", "bold red"), f": {err}")
    Console(stderr=True).print(message, highlight=False, soft_wrap=True)


def _task(cfg: DictConfig) -> Optional[float]:
    """One run (or one sweep job). Returns sweep.objective's value, which Optuna maximises/minimises."""
    from tunelab import pipeline, sweep
    from tunelab.config.checks import ConfigError, validate
    from tunelab.data.formats import DataError
    from tunelab.export.llama_cpp import ExportError
    from tunelab.records import IntegrityError
    from tunelab.rundir import RunDirError
    from tunelab.templates.chat import TemplateError, TemplateLimitError
    from tunelab.templates.parity import ParityError
    from tunelab.training import nodes
    from tunelab.training.launch import RankFailed

    multirun, parent_run_id, tags = _job_context(cfg)
    if multirun and not sweep.started_here():  # a worker process: Ctrl-C reaches it from the sweep
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # process, as SIGTERM, when its job is running
    follower = nodes.role() == "follower"  # a SLURM node other than 0: only its share of the ranks
    try:
        if follower:
            validate(cfg)  # the same verdict as node 0's, at once, instead of waiting for a launch
            return nodes.follow(cfg)
        with nodes.leading(cfg):  # node 0 of several: the other nodes learn how its run ended
            results = pipeline.run(cfg, parent_run_id=parent_run_id, extra_tags=tags, sweep_job=multirun)
    except KeyboardInterrupt as interrupt:  # the run has ended KILLED
        if multirun:
            _end_worker(interrupt, tracked=bool(cfg.tracking.enabled) and not follower)
        raise
    except (ConfigError, DataError, FileNotFoundError, TemplateError, TemplateLimitError, ParityError,
            ExportError, IntegrityError, RunDirError) as err:
        print_error(err)
        if multirun:
            raise  # Hydra marks this job FAILED and goes on with the others
        sys.exit(2)
    except RankFailed as err:  # the run has ended FAILED; the message names the rank and its log
        if multirun:
            raise
        print_error(err)  # RankFailed, or NodeFailed on a node other than 0
        sys.exit(1)
    _exit_if_nothing_ships(results, multirun)
    return pipeline.objective_value(cfg, results)


class NothingToShip(RuntimeError):
    """Every fine-tuned GGUF of the run is BROKEN (a floor, or a non-finite score)."""


def _exit_if_nothing_ships(results: dict, multirun: bool) -> None:
    """Exit NOTHING_SHIPS once the run is logged (its verdict is in MLflow and on the terminal)."""
    verdict = results.get("evaluate", {}).get("verdict")
    if verdict is None or verdict.get("ship") is not None:
        return
    from rich.console import Console

    message = "every fine-tuned GGUF is BROKEN, nothing to ship: " + "; ".join(
        f"{q}: {', '.join(why)}" for q, why in verdict["reasons"].items())
    if multirun:
        raise NothingToShip(message)  # Hydra marks this job FAILED and goes on with the others
    Console(stderr=True).print(f"tunelab: {message} (exit {NOTHING_SHIPS})", highlight=False, markup=False,
                               soft_wrap=True)
    sys.exit(NOTHING_SHIPS)


def _end_worker(interrupt: KeyboardInterrupt, tracked: bool) -> None:
    """A sweep job interrupted in a worker process (joblib, submitit) has ended its run KILLED. The
    worker must neither start another job nor exit while other workers are still ending theirs (the
    joblib pool kills every worker when one dies): it waits to be killed, or for the sweep process to
    end. Untracked, there is nothing to wait for: it exits, which is what the sweep process waits for."""
    from tunelab import runstate, sweep

    if sweep.started_here():
        return  # jobs run in the sweep's own process (the basic launcher): it ends the sweep
    sys.stdout.flush()
    sys.stderr.flush()
    if tracked:
        runstate.park()
    os._exit(runstate.exit_code(interrupt))


def _multirun(argv) -> bool:
    return any(arg in ("-m", "--multirun") or arg.replace(" ", "") == "hydra.mode=MULTIRUN" for arg in argv)


# Hydra's own flags: these take the next argument as their value; these use a config of their own;
# these print and run nothing.
_TAKES_VALUE = ("--cfg", "-c", "--package", "-p", "--experimental-rerun")
_OWN_CONFIG = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd")
_RUNS_NOTHING = ("--help", "-h", "--hydra-help", "--version", "--shell-completion", "-sc", "--cfg", "-c",
                 "--info", "-i")
_INFO = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")


def _overrides(argv) -> list:
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg.startswith("-"):
            skip = arg in _TAKES_VALUE or arg in ("--info", "-i") and i + 1 < len(argv) and argv[i + 1] in _INFO
        else:
            out.append(arg)
    return out


def preflight(argv) -> None:
    """Config errors before Hydra starts anything (no run directory, no MLflow run): exit 2, naming the
    key. A single run composes its config here; a sweep's overrides are checked one by one."""
    if any(arg.split("=")[0] in _OWN_CONFIG for arg in argv):
        return
    try:
        if _multirun(argv) or any(arg in _RUNS_NOTHING for arg in argv):
            override_checks.check(_overrides(argv), conf_dirs())
        else:
            from tunelab.config.checks import validate

            validate(compose(_overrides(argv)))  # the cross-field rules too: Hydra would make the run dir
    except ConfigError as err:
        print_error(err)
        sys.exit(2)
    if any(arg in ("--help", "-h") for arg in argv):
        project = project_conf()
        print(f"Groups and experiments: tunelab's ({package_conf()})" +
              (f" and yours ({project}; yours win on a name both have)" if project else
               "; yours go in ./conf/<group>/<option>.yaml (or $TUNELAB_CONF): `tunelab init` writes a start"))


# name -> module under tunelab.commands with a main(argv: list[str]) -> int
SUBCOMMANDS: dict = {"data": "data", "serve": "serve", "runs": "runs", "reproduce": "reproduce", "init": "init"}


def _subcommand(name: str, argv) -> int:
    import importlib

    module = importlib.import_module(f"tunelab.commands.{SUBCOMMANDS[name]}")
    try:
        return module.main(argv)
    except ConfigError as err:
        print_error(err)
        return 2


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in SUBCOMMANDS:
        sys.exit(_subcommand(sys.argv[1], sys.argv[2:]))
    preflight(sys.argv[1:])
    register_configs()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app = hydra.main(version_base="1.3", config_path=str(package_conf()), config_name="config")(_task)
    from tunelab import runstate, sweep

    try:
        # A sweep's jobs may run in worker processes: a signal to the sweep reaches them too.
        with runstate.sigterm_raises(on_interrupt=sweep.stop_jobs if _multirun(sys.argv[1:]) else None):
            app()
    except KeyboardInterrupt as interrupt:  # Ctrl-C or SIGTERM: runs and the sweep end KILLED
        sweep.finish(interrupted=True)
        sys.exit(runstate.exit_code(interrupt))
    finally:
        sweep.finish(interrupted=False)  # a failed sweep: Hydra exits before its end callback


if __name__ == "__main__":
    main()
