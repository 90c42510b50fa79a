"""Every key a composed config can hold, read from the YAML files and the ``_target_`` signatures without
composing anything or importing torch: the preflight (harness/preflight.py) names a misspelled key at any
depth (``train.tokns=1``, ``pretrain.optim.lrr=1``, ``+train.lr=1``) in one line, with the key it most likely
meant, before Hydra's seven-line "not in struct" message.

The tree is a union over every preset, so it only ever lets a key through that no selection holds (never the
other way round): a key that some preset of the block has passes, whichever preset the command line picks."""

from __future__ import annotations

import ast
import difflib
import functools
import re
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESET_DIRS = (ROOT / "conf", ROOT / "sweeps")  # the config search path (hydra_plugins/upcycle_searchpath)
_PACKAGE = re.compile(r"^#\s*@package\s+(\S+)", re.M)
_HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}


@dataclass
class Node:
    """One block of the config: the keys its YAML gives it (``children``) and the arguments its ``_target_``
    takes (``fields``: None when any key goes, as for ``lightning.Trainer`` or a plain dict)."""

    children: dict[str, Node] = field(default_factory=dict)
    targets: set[str] = field(default_factory=set)
    scalar: bool = False  # some preset sets this key to a value that is not a block (a list, a number, null)

    @functools.cached_property
    def fields(self) -> set[str] | None:
        if not self.targets:
            return None
        names: set[str] = set()
        for target in self.targets:
            args = _target_args(target)
            if args is None:
                return None
            names |= args
        return names

    def child(self, name: str) -> Node:
        return self.children.setdefault(name, Node())


def _merge(node: Node, value) -> None:
    if not isinstance(value, dict):
        node.scalar = True
        return
    for key, sub in value.items():
        key = str(key)
        if key == "defaults":
            continue
        if key == "_target_":
            node.targets.add(str(sub))
        elif key not in _HYDRA_KEYS:
            _merge(node.child(key), sub)


def _package(f: Path, d: Path) -> list[str]:
    """Where a preset's keys land: its ``# @package`` header, else its group's path (conf/moe/x.yaml: moe)."""
    head = "".join(line for line in f.read_text().splitlines(True)[:8] if line.startswith("#"))
    m = _PACKAGE.search(head)
    package = m.group(1) if m else ".".join(f.relative_to(d).parent.parts)
    return [] if package in ("_global_", "") else package.split(".")


@functools.cache
def key_tree() -> Node:
    """The union of config.yaml and every preset of conf/ and sweeps/, placed at its package."""
    import yaml

    root = Node()
    _merge(root, yaml.safe_load((ROOT / "conf" / "config.yaml").read_text()))
    for d in PRESET_DIRS:
        for f in sorted(d.rglob("*.yaml")):
            node = root
            for part in _package(f, d):
                node = node.child(part)
            _merge(node, yaml.safe_load(f.read_text()) or {})
    return root


@functools.cache
def _target_args(target: str) -> frozenset[str] | None:
    """The keyword arguments of a ``harness.*`` class or function, read from its source (no import): a
    dataclass's fields, a function's parameters; None (any key goes) for other packages or ``**kwargs``."""
    module, _, name = target.rpartition(".")
    path = ROOT / Path(*module.split(".")).with_suffix(".py")
    if not module.startswith("harness.") or not path.is_file():
        return None
    tree = ast.parse(path.read_text())
    defs = {n.name: n for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
    found = defs.get(name)
    if isinstance(found, ast.FunctionDef):
        a = found.args
        if a.kwarg is not None:
            return None
        return frozenset(x.arg for x in a.posonlyargs + a.args + a.kwonlyargs)
    body = getattr(found, "body", [])
    init = next((n for n in body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
    if init is not None:  # a class with its own __init__ (TokenDataModule): its parameters, less self
        a = init.args
        return None if a.kwarg is not None else frozenset(x.arg for x in (a.posonlyargs + a.args)[1:] + a.kwonlyargs)
    if isinstance(found, ast.ClassDef) and not found.bases:
        return frozenset(
            s.target.id for s in found.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
        )
    return None  # a base class or a name this cannot read for sure: left to Hydra


@functools.cache
def groups() -> frozenset[str]:
    """The config groups at the top of the search path (routing, moe, sweep, ...): ``group=preset`` choices."""
    return frozenset(p.name for d in PRESET_DIRS for p in d.iterdir() if p.is_dir())


def _paths(node: Node, prefix: str = "") -> list[str]:
    out = []
    for name in sorted(set(node.children) | (node.fields or set())):
        path = prefix + name
        out.append(path)
        if name in node.children:
            out += _paths(node.children[name], path + ".")
    return out


def _suggest(parent: str, name: str, siblings: set[str], rest: str) -> str:
    """The key the user most likely meant: a close sibling (tokns: tokens), else the same name in another
    block (train.lr: optim.lr), else the closest full key."""
    near = difflib.get_close_matches(name, sorted(siblings), n=1)
    if near:
        return f"{parent}{near[0]}{rest}"
    full = _paths(key_tree())
    same = sorted((p for p in full if p.rsplit(".", 1)[-1] == name), key=lambda p: (p.count("."), p))
    if same:
        return same[0] + rest
    near = difflib.get_close_matches(f"{parent}{name}{rest}", full, n=1, cutoff=0.8)
    return near[0] if near else ""


def check_key(arg: str) -> None:
    """Raise SystemExit with one line when ``arg``'s key (``a.b.c=v``, ``+a.b=v``, ``++a.b=v``) names no key
    the config or its block's ``_target_`` has; a key this cannot read for sure is left to Hydra."""
    typed = arg.split("=", 1)[0]
    plus = len(typed) - len(typed.lstrip("+"))
    key = typed.lstrip("+")
    if not re.fullmatch(r"[a-z_]\w*(\.[a-z_]\w*)*", key) or key.split(".")[0] == "hydra":
        return
    parts = key.split(".")
    if len(parts) == 1 and (plus or key in groups()):
        return  # routing=topk_softmax, +sweep=ladder, +new_key=1: a group choice or a new top-level key
    node, parent = key_tree(), ""
    for i, name in enumerate(parts):
        last = i == len(parts) - 1
        fields = node.fields
        if name in node.children:
            sub = node.children[name]
            if sub.scalar and not sub.children and not last:
                return  # into a value that is not a block (a dict some preset sets as null): Hydra's to say
            node, parent = sub, f"{parent}{name}."
            continue
        if node.scalar and i > 0:
            return  # some preset sets this block to a plain value: Hydra's to say
        rest = "." + ".".join(parts[i + 1 :]) if not last else ""
        block = parent[:-1] or "the config"
        if fields is not None and name in fields:
            if plus:
                return  # +train.collapse_steps=50: a field the YAML leaves at its default, added
            raise SystemExit(
                f"config error: {key}: {block} does not list {name!r} (an argument{_of(node)} left at its default): "
                f"set it with +{key}=..."
            )
        hint = _suggest(parent, name, set(node.children) | (fields or set()), rest)
        hint = f" (did you mean {hint}?)" if hint else ""
        if fields is None:  # a plain block or another package's class: a new key may be wanted
            if plus:
                return
            what = f"{block} has no key" if parent else "the config has no key"
            raise SystemExit(f"config error: {key}: {what} {name!r}{hint}; a new key is added with +{key}=...")
        raise SystemExit(f"config error: {typed}: {block}{_of(node, ' ({})')} has no key {name!r}{hint}")


def _of(node: Node, form: str = " of {}") -> str:
    """The block's class for a message, where one class builds it (model's presets have two targets)."""
    return form.format(next(iter(node.targets)).rsplit(".", 1)[-1]) if len(node.targets) == 1 else ""
