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


def conf_dirs() -> List[Path]:
    """The search path's folders, first wins: the project's conf/ (if any), then tunelab's."""
    project = project_conf()
    return [project, PACKAGE_CONF] if project else [PACKAGE_CONF]


def compose(overrides: List[str], resolve_check: bool = True) -> DictConfig:
    """The config `tunelab <overrides>` runs with. Raises ConfigError naming the key for an unknown key,
    group option or experiment, a value of the wrong type, or an interpolation that cannot resolve."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from tunelab.config import overrides as override_checks
    from tunelab.config.schema import register_configs

    override_checks.check(list(overrides), conf_dirs())
    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(package_conf()), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=list(overrides))
        if resolve_check:
            OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError([describe(err)]) from None
    finally:
        GlobalHydra.instance().clear()
    return cfg


def describe(err: Exception) -> str:
    """One line naming the key (and the file, when Hydra says which) of a Hydra or OmegaConf error."""
    import re

    from omegaconf.errors import MissingMandatoryValue

    from tunelab.config.overrides import key_problem, schema_keys

    cause = err.__cause__ or err
    text = str(cause)
    found = re.search(r"full_key: (\S+)", text)
    key = getattr(cause, "full_key", None) or (found.group(1) if found else "")
    lines = [line.strip() for line in text.splitlines() if line.strip()
             and not line.strip().startswith(("full_key:", "object_type=", "reference_type="))]
    where = re.match(r"In '([^']+)'", text)
    message = next((line for line in lines if line.startswith("Key ")), lines[-1] if lines else type(cause).__name__)
    if isinstance(cause, MissingMandatoryValue):
        message = "has no value: set it in the config file that defines it (or on the command line: key=...)"
    elif key and (hint := key_problem(key, schema_keys(), adding=False)):
        message = f"{message}; {hint.split(': ', 1)[1]}"
    if where:
        message += f" (in {where.group(1)}.yaml)"
    return f"{key}: {message}" if key else message
