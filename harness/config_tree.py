"""Print the composed config as a rich tree at start (lightning-hydra-template style)."""

from __future__ import annotations

import rich
import rich.syntax
import rich.tree
from omegaconf import DictConfig, OmegaConf

ORDER = ("method", "model", "moe", "upcycle", "optim", "data", "train", "pretrain", "trainer", "logger")


def print_config_tree(cfg: DictConfig) -> None:
    tree = rich.tree.Tree("CONFIG", guide_style="dim")
    keys = [k for k in ORDER if k in cfg] + [k for k in cfg if k not in ORDER and k != "paths"]
    for key in keys:
        branch = tree.add(str(key))
        value = cfg[key]
        text = OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        branch.add(rich.syntax.Syntax(text, "yaml"))
    rich.print(tree)
