"""Where the config comes from, and composing it outside the Hydra app (for plain subcommands:
`tunelab data check experiment=tweets`, `tunelab reproduce ...`) as `tunelab` composes it.

Two places, in Hydra's search path: tunelab's own groups and experiments (`conf/` inside the
package, the primary config) and, ahead of them, the user's project folder: `$TUNELAB_CONF` if set,
else `./conf` when it exists (hydra_plugins/tunelab_project puts it there). A file of the project
adds an option to a group (`conf/dataset/mine.yaml`: `dataset=mine`; `conf/experiment/mine.yaml`:
`experiment=mine`) or replaces ours of the same name; a `conf/config.yaml` there replaces our root.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

from omegaconf import DictConfig

from tunelab.config.errors import ConfigError

PACKAGE_CONF = Path(__file__).resolve().parents[1] / "conf"


def package_conf() -> Path:
    """tunelab's own config groups and experiments (inside the package: the wheel ships them)."""
    return PACKAGE_CONF


def is_package_conf(search_path_entry: str) -> bool:
    path = search_path_entry.removeprefix("file://")
    return os.path.isabs(path) and Path(path).resolve() == PACKAGE_CONF


def project_conf() -> Optional[Path]:
    """The user's conf/: $TUNELAB_CONF (which must be a folder), else ./conf if there is one."""
    named = os.environ.get("TUNELAB_CONF")
    if named:
        if not Path(named).is_dir():
            raise ConfigError([f"TUNELAB_CONF={named!r} is not a folder (relative to {Path.cwd()}): point it at "
                               "your project's conf/, or unset it to use ./conf"])
        found = Path(named).resolve()
    elif (Path.cwd() / "conf").is_dir():
        found = (Path.cwd() / "conf").resolve()
    else:
        return None
    return None if found == PACKAGE_CONF else found


def compose(overrides: List[str]) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from tunelab.config.schema import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(package_conf()), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))
