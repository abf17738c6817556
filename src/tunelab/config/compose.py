"""Compose the project's config outside the Hydra app, for plain subcommands (`tunelab data check
experiment=tweets`, `tunelab reproduce ...`): the same groups, schema and overrides as `tunelab`."""
from __future__ import annotations

from typing import List

from omegaconf import DictConfig


def compose(overrides: List[str]) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from tunelab.cli import config_dir
    from tunelab.config.schema import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))
