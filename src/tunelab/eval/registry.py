"""The metric registry: `eval.metrics` maps a name to {_target_: dotted.path, **keyword arguments}.

`_target_` is the extension point: any importable callable taking the list of Generation (and the
keyword arguments) and returning a number is a metric. Arguments are checked when the config is
validated, so a typo fails before anything is trained.
"""
from __future__ import annotations

import inspect
from functools import partial
from typing import Callable, Dict, List

from omegaconf import DictConfig, OmegaConf

BUILTIN_MODULE = "tunelab.eval.metrics"


def _plain(spec) -> dict:
    return dict(OmegaConf.to_container(spec, resolve=True)) if isinstance(spec, DictConfig) else dict(spec)


def metric_from_spec(name: str, spec) -> Callable:
    """The callable named by spec["_target_"], its keyword arguments bound. Raises ValueError naming
    the config key on an unknown target, an unknown or missing argument, or a bad argument value."""
    from hydra.utils import get_method

    kwargs = _plain(spec)
    target = kwargs.pop("_target_", None)
    key = f"eval.metrics.{name}"
    if not target:
        raise ValueError(f"{key} needs a _target_ (a dotted path to a callable)")
    try:
        fn = get_method(target)
    except Exception as err:  # hydra wraps import errors in its own types
        raise ValueError(f"{key}._target_={target!r} cannot be imported: {err}") from None
    try:
        inspect.signature(fn).bind([], **kwargs)
    except TypeError as err:
        raise ValueError(f"{key}: {target}{inspect.signature(fn)} does not accept {kwargs}: {err}") from None
    metric = partial(fn, **kwargs)
    if fn.__module__ == BUILTIN_MODULE:
        try:  # built-ins check their arguments (a pattern, a schema, a unit) on an empty list
            metric([])
        except Exception as err:
            raise ValueError(f"{key}: {err}") from None
    return metric


def metrics_from_config(metrics_cfg) -> Dict[str, Callable]:
    return {name: metric_from_spec(name, spec) for name, spec in metrics_cfg.items()}


def metric_problems(metrics_cfg) -> List[str]:
    problems = []
    for name, spec in metrics_cfg.items():
        try:
            metric_from_spec(name, spec)
        except ValueError as err:
            problems.append(str(err))
    return problems
