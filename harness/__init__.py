"""Nothing is downloaded at run time: the Hugging Face libraries (hub, datasets, transformers) run offline unless
the environment says otherwise (``HF_HUB_OFFLINE=0``). Set here, before any of them is imported: they read it once
(datasets follows it unless ``HF_DATASETS_OFFLINE`` is set)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
