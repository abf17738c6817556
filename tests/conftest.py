from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from tunelab.config.schema import register_configs

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "src" / "tunelab" / "conf"


@pytest.fixture
def compose_cfg(monkeypatch):
    """Compose the project's config as `tunelab <overrides>` would, from the repo root."""
    monkeypatch.chdir(ROOT)
    register_configs()

    def _compose(*overrides):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))

    yield _compose
    GlobalHydra.instance().clear()
