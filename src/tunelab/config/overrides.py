"""Command-line overrides checked before Hydra composes anything: every `group=option` names an option
that exists (ours or the project's), every `key=value` a key of the schema, and `+key` is refused for
a key the schema does not know (Hydra would append it and nothing would read it) or already has.
Each problem names the key and what to write instead ("did you mean training.learning_rate?")."""
from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from pathlib import Path
from typing import Dict, List, Optional

from tunelab.config.errors import ConfigError

# A key whose value is a mapping or free-form: anything below it is the user's (eval.metrics.<name>).
OPEN = "*"


def schema_keys() -> Dict[str, str]:
    """Every key of the root schema (tunelab.config.schema.Config): full key -> OPEN or ''."""
    from tunelab.config.schema import Config

    keys: Dict[str, str] = {}
    _walk(Config, "", keys)
    return keys


def _walk(node, prefix: str, keys: Dict[str, str]) -> None:
    hints = typing.get_type_hints(node)
    for f in dataclasses.fields(node):
        key, hint = prefix + f.name, hints[f.name]
        if dataclasses.is_dataclass(hint):
            keys[key] = ""
            _walk(hint, key + ".", keys)
        else:
            origin = typing.get_origin(hint)
            keys[key] = OPEN if hint is typing.Any or origin in (dict, list, typing.Union) and _open(hint) else ""
            element = typing.get_args(hint)[0] if origin is list else None
            if element is not None and dataclasses.is_dataclass(element):
                _walk(element, key + ".", keys)  # dataset.sources[0].path: checked as dataset.sources.path


def _open(hint) -> bool:
    args = typing.get_args(hint)
    if typing.get_origin(hint) is dict:
        return True
    if typing.get_origin(hint) is list:
        return not (args and dataclasses.is_dataclass(args[0]))
    return any(a is typing.Any for a in args)  # Optional[Any]


def group_options(conf_dirs: List[Path]) -> Dict[str, Dict[str, Path]]:
    """group -> option -> the folder it comes from (earlier folders win, as in Hydra's search path)."""
    groups: Dict[str, Dict[str, Path]] = {}
    for conf in conf_dirs:
        for path in sorted(conf.rglob("*.yaml")):
            group = path.parent.relative_to(conf).as_posix()
            if group != ".":
                groups.setdefault(group, {}).setdefault(path.stem, conf)
    return groups


def _plain_key(key: str) -> str:
    return re.sub(r"\[\d+\]", "", key)


def key_problem(key: str, keys: Dict[str, str], adding: bool) -> Optional[str]:
    """Why `key` (as written, without + or ~) is not something the schema lets one set, or None."""
    plain = _plain_key(key)
    parts = plain.split(".")
    for depth in range(1, len(parts)):
        if keys.get(".".join(parts[:depth])) == OPEN:
            return None  # below a mapping: the user's own keys (eval.metrics.exact._target_)
    if plain in keys:
        if adding:
            return (f"+{key}: {key} is already a config key; set it without '+': {key}=...")
        return None
    near = difflib.get_close_matches(plain, list(keys), n=1, cutoff=0.6)
    hint = f"did you mean {near[0]}?" if near else _siblings(plain, keys)
    what = f"+{key}" if adding else key
    return f"{what}: no such config key ({hint})"


def _siblings(key: str, keys: Dict[str, str]) -> str:
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    children = sorted(k.rsplit(".", 1)[-1] for k in keys if (k.rsplit(".", 1)[0] if "." in k else "") == parent)
    where = parent or "the root"
    return f"the keys of {where} are: {', '.join(children)}" if children else "see `tunelab --help`"


def option_problem(group: str, option: str, groups: Dict[str, Dict[str, Path]], ours: Path) -> Optional[str]:
    options = groups.get(group, {})
    if option in options or option == "null" and group == "experiment":
        return None
    listed = ", ".join(f"{name}" + ("" if where == ours else f" (yours, {where})") for name, where in sorted(options.items()))
    near = difflib.get_close_matches(option, list(options), n=1, cutoff=0.6)
    hint = f"did you mean {group}={near[0]}? " if near else ""
    # A project's own options come from ./conf of the folder tunelab runs in: say so where none was
    # found, since running from a subfolder of the project is the usual way to miss them.
    yours = "" if any(where != ours for where in options.values()) else (
        f" (your own options are read from ./conf/{group}/ of the folder tunelab runs in, {Path.cwd()}, "
        "or from $TUNELAB_CONF)")
    return f"{group}={option}: no such option of group {group}; {hint}options: {listed}{yours}"


def _values(override) -> List[str]:
    if override.is_sweep_override():
        try:
            return [str(v) for v in override.sweep_string_iterator()]
        except Exception:  # noqa: BLE001 - a range or interval sweep: Hydra checks its values itself
            return []
    return [override.get_value_element_as_str()]


def problems(args: List[str], conf_dirs: List[Path]) -> List[str]:
    """Every problem of the command-line overrides `args` (flags such as -m are skipped)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    texts = [a for a in args if not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(texts)
    except OverrideParseException as err:
        return [f"cannot read the overrides: {err}"]
    keys, groups, found = schema_keys(), group_options(conf_dirs), []
    for override in parsed:
        name = override.key_or_group
        if name == "hydra" or name.startswith(("hydra.", "hydra/")) or override.is_delete():
            continue  # Hydra's own settings and groups: Hydra checks them
        if name in groups and override.package is None:
            found += [p for v in _values(override) if (p := option_problem(name, v, groups, conf_dirs[-1]))]
        else:
            problem = key_problem(name, keys, adding=override.is_add())  # ++key: set or add, known keys only
            found += [problem] if problem else []
    return found


def check(args: List[str], conf_dirs: List[Path]) -> None:
    found = problems(args, conf_dirs)
    if found:
        raise ConfigError(found)
