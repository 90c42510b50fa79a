"""The named sweeps (``+sweep=<name>``, ``+scale=<name>``) live in ``sweeps/`` beside ``conf/``: found from any
working directory, not only the repository root (a relative ``file://sweeps`` search path is read from the cwd)."""

from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

ROOT = Path(__file__).resolve().parents[2]


class UpcycleSweeps(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        if any(Path(p.path) == ROOT / "conf" for p in search_path.get_path() if p.provider == "main"):
            search_path.append("upcycle-sweeps", f"file://{ROOT / 'sweeps'}")
