"""A Hydra search-path plugin: when the app's primary config is tunelab's packaged conf/, the user's
project conf/ ($TUNELAB_CONF, else ./conf) goes first in the search path, so their group options and
experiments add to ours and override ours of the same name (`tunelab --help` lists both)."""
from __future__ import annotations

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class TunelabProjectSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        from tunelab.config.compose import is_package_conf, project_conf

        main = [e.path for e in search_path.get_path() if e.provider == "main"]
        if not main or not is_package_conf(main[0]):
            return  # another Hydra app, or a test composing from a folder of its own
        project = project_conf()
        if project is not None:
            search_path.prepend(provider="tunelab-project", path=f"file://{project}")
