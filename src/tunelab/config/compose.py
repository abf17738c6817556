"""Compose the project's config outside the Hydra app, for plain subcommands (`tunelab data check
experiment=tweets`, `tunelab reproduce ...`): the same groups, schema and overrides as `tunelab`."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List

from omegaconf import DictConfig


def config_dir() -> Path:
    """conf/ of the project tunelab runs in: $TUNELAB_CONF, ./conf, or the one beside this package."""
    candidates = [os.environ.get("TUNELAB_CONF"), Path.cwd() / "conf", Path(__file__).resolve().parents[3] / "conf"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "config.yaml").is_file():
            return Path(candidate).resolve()
    raise SystemExit("tunelab: no conf/config.yaml here; run from the project root or set TUNELAB_CONF")


def compose(overrides: List[str]) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from tunelab.config.schema import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))
