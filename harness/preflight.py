"""Before a sweep computes anything: every job's config is built and checked, and each bad one is named in one
line. Hydra itself stops a sweep whose jobs cannot be composed (``routing=bogus``); a value that composes but
is invalid (``moe.top_k=16`` with 8 experts) is ours to catch. That job still fails on its own (recorded in its
folder, the others run: a grid may hold invalid cells), but the user reads which and why at once, not after
the other jobs have trained."""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from harness.config_keys import PRESET_DIRS, check_key

log = logging.getLogger("upcycle")

_CHOICE = re.compile(r"^\+{0,2}([a-z_][\w/]*)=([\w.,-]+)$")  # group=name or a sweep group=a,b (no functions)
# keys that are gone, with what replaces them (Hydra's own message would only say the key is not in the struct)
REMOVED = {
    "data.val_batches": "set data.val_tokens (validation tokens; the windows no longer depend on the batch size)",
}


def check_presets(argv: list[str]) -> None:
    """A preset name that does not exist (``routing=softmax``, ``+sweep=rouitng``) stops in one line naming it
    and the group's presets, and so does a key at any depth that no config has (``trian.tokens=10``,
    ``train.tokns=1``, ``+train.lr=1``: harness/config_keys.py); Hydra's own messages are seven to eleven lines.
    Anything this cannot read for sure (sweep functions, another config dir) is left to Hydra."""
    if any(a.startswith(("--config-dir", "-cd", "--config-path", "-cp", "hydra.searchpath")) for a in argv):
        return
    for arg in argv:
        key = arg.split("=", 1)[0].lstrip("+~")
        if key in REMOVED:
            raise SystemExit(f"config error: {key} is gone: {REMOVED[key]}")
        if "=" in arg and not arg.startswith(("~", "-")):
            check_key(arg)
        m = _CHOICE.match(arg)
        if not m:
            continue
        group, names = m.groups()
        typed = arg.split("=", 1)[0]  # +sweep as the user wrote it
        dirs = [d / group for d in PRESET_DIRS if (d / group).is_dir()]
        hydra_own = _hydra_presets(group) if group.startswith("hydra/") else set()
        if not dirs and not hydra_own:
            continue  # a config key (seed=1, method=dense): checked when the config is built
        presets = sorted({p.stem for d in dirs for p in d.glob("*.yaml")} | hydra_own)
        for name in names.split(","):
            if name not in presets and name != "null":
                article = "an" if group[0] in "aeiou" else "a"
                raise SystemExit(
                    f"config error: {typed}={name} is not {article} {group} preset (presets: {', '.join(presets)})"
                )


FOLDERS = {"paths.log_dir": ("UPCYCLE_LOGS", "logs"), "paths.cache_dir": ("UPCYCLE_CACHE", ".cache")}


def check_folders(argv: list[str]) -> None:
    """``paths.log_dir`` and ``paths.cache_dir`` (or UPCYCLE_LOGS / UPCYCLE_CACHE) must be folders that can be made:
    a file in the way stops in one line, before Hydra makes the run folder under it (a traceback otherwise)."""
    given = {a.split("=", 1)[0].lstrip("+"): a.split("=", 1)[1] for a in argv if "=" in a}
    for key, (env, default) in FOLDERS.items():
        value = given.get(key)
        named = f"{key}={value}" if value is not None else f"{env}={os.environ.get(env)}"
        value = value if value is not None else os.environ.get(env, default)
        if "${" in value or "," in value:  # an interpolation or a sweep: left to the job
            continue
        path = Path(value).expanduser()
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            where = "" if blocker == path else f" ({blocker} is a file)"
            raise SystemExit(f"config error: {named} must be a folder, but it is a file{where}")


def _hydra_presets(group: str) -> set[str]:
    """The presets Hydra and its installed plugins register for ``hydra/launcher``, ``hydra/sweeper``, ...
    (``basic``, ``joblib``, ``submitit_slurm``, ``optuna``); empty for a group it does not hold."""
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins

    Plugins.instance()  # imports the installed plugins, which register their configs
    node = ConfigStore.instance().repo.get("hydra", {}).get(group.split("/", 1)[1], {})
    return {name.removesuffix(".yaml") for name in node} if isinstance(node, dict) else set()


def sweep_jobs(config: DictConfig) -> list[list[str]]:
    """The override lists of every job a basic sweep of ``config`` launches (Hydra's own expansion)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    params += list(config.hydra.overrides.task)
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    return [list(job) for batch in BasicSweeper.split_arguments(parser.parse_overrides(params), None) for job in batch]


class CheckSweep(Callback):
    """Hydra callback (conf/hydra/default.yaml): names the sweep's invalid jobs before the first one starts."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        launcher = str(config.hydra.launcher.get("_target_", ""))
        if launcher.endswith("SlurmLauncher") and shutil.which("sbatch") is None:
            raise SystemExit(
                "config error: hydra/launcher=slurm submits with SLURM's sbatch, which is not on PATH here: run the "
                "sweep from a SLURM login node, or use hydra/launcher=basic or parallel"
            )
        n_jobs = config.hydra.launcher.get("n_jobs")
        if launcher.endswith("JoblibLauncher") and (
            isinstance(n_jobs, bool) or not isinstance(n_jobs, int) or not n_jobs
        ):
            raise SystemExit(
                f"config error: hydra.launcher.n_jobs={n_jobs!r} must be a whole number of worker processes other "
                "than 0 (-1: one per CPU, as joblib counts)"
            )
        if not str(config.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
            return  # Optuna & co. choose values as they go: each trial is checked when it starts
        from hydra.core.global_hydra import GlobalHydra

        from harness.errors import ConfigError
        from harness.experiment import build_experiment
        from harness.launch import check_devices

        local = launcher.endswith(("BasicLauncher", "JoblibLauncher"))  # not SLURM: its login node has no GPU
        loader = GlobalHydra.instance().config_loader()
        jobs = sweep_jobs(config)
        swept = {o for job in jobs for o in job if sum(o in other for other in jobs) < len(jobs)}
        bad = []
        for overrides in jobs:
            try:
                job = loader.load_sweep_config(config, overrides)
                build_experiment(job)
                if local:
                    check_devices(job.trainer)
            except ConfigError as e:
                name = ",".join(o for o in overrides if o in swept) or ",".join(overrides)
                bad.append(f"config error in job {name}: {e}")
            except Exception:  # composition errors are Hydra's to report; anything else surfaces in the job
                continue
        for line in bad:
            log.error(line)
        if bad and len(bad) == len(jobs):  # nothing would run: stop here, as a single run does
            raise SystemExit(f"config error: every job of the sweep has a bad config ({len(jobs)} named above)")
        if bad:
            wait = 5 if sys.stderr.isatty() else 0  # someone watching: time to read the lines and stop the sweep
            log.error(
                "%d of %d jobs %s a bad config: %s and is recorded in its folder; the others run%s",
                len(bad),
                len(jobs),
                "has" if len(bad) == 1 else "have",
                "it fails" if len(bad) == 1 else "each fails",
                f" (starting in {wait} s: Ctrl-C to fix the sweep first)" if wait else "",
            )
            time.sleep(wait)
