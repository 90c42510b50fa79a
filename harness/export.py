"""Write a trained model as a Hugging Face checkpoint that ``transformers`` loads and that computes
the same logits as our :class:`Decoder`.

    python -m harness.export <run_dir> <out_dir>

Which HF class:
- dense: ``LlamaForCausalLM`` (``Qwen2ForCausalLM`` when q/k/v have biases);
- MoE with ``topk_softmax``, G = 1, every layer MoE, no q/k/v bias: ``MixtralForCausalLM`` (Mixtral takes
  the top-k logits and softmaxes them);
- any other MoE: ``Qwen2MoeForCausalLM``: softmax over all experts then top-k, renormalised
  (``norm_topk_prob``) for ``topk_softmax`` and not for ``softmax_topk``; the expert width d_ff/G is
  its ``moe_intermediate_size``, dense layers are its ``mlp_only_layers``, its shared expert is zeroed
  (so is its gate), q/k/v biases are ours or zero. With shared experts (``moe.shared_experts=S``) its shared
  expert is ours (width S*d_ff/G), its down-projection doubled because the zero-initialised sigmoid gate
  ``shared_expert_gate`` multiplies it by sigmoid(0) = 1/2 (exact: powers of two).
- no HF class computes a squared-ReLU (``relu2``) MLP or MoE: that is an error; nor one that drops tokens
  over capacity (``moe.capacity_factor``), nor a routing other than softmax_topk / topk_softmax.
Weight scaling and granularity live in the weights themselves, so they need nothing special.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import torch

from harness.errors import ConfigError
from harness.model import Decoder
from harness.moe import MoE, MoEConfig

# one MoE layer's parameters: ours -> HF's sparse MoE blocks' (Mixtral's, Qwen2-MoE's); both store each expert's
# nn.Linear weights stacked ([gate; up] rows, then down), so the tensors map as they are
MOE_TO_HF = {"router.weight": "gate.weight", "experts.w1": "experts.gate_up_proj", "experts.w2": "experts.down_proj"}


def hf_class(model: Decoder, moe: MoEConfig | None) -> str:
    """The transformers class that computes ``model`` exactly, or a ConfigError saying why none does."""
    cfg = model.cfg
    if cfg.activation != "swiglu":
        raise ConfigError(
            f"model.activation={cfg.activation!r}: no Hugging Face class computes a squared-ReLU "
            "(non-gated) MLP; only swiglu models can be exported"
        )
    layers = list(getattr(model, "moe_layers", []) or [])
    if not layers:
        return "Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"
    _check_hf_moe(moe)
    # renormalised softmax_topk weights are topk_softmax's (the softmax's shared normaliser cancels)
    topk_then_softmax = moe.routing == "topk_softmax" or moe.norm_topk_prob
    mixtral = topk_then_softmax and moe.granularity == 1 and not moe.shared_experts
    if mixtral and len(layers) == cfg.n_layers and not cfg.qkv_bias:
        return "MixtralForCausalLM"
    return "Qwen2MoeForCausalLM"


HF_ROUTINGS = ("softmax_topk", "topk_softmax")  # the softmax routers that Mixtral / Qwen2-MoE compute


def _check_hf_moe(moe: MoEConfig) -> None:
    """A ConfigError naming the nearest class for an MoE recipe that no exported HF class computes."""
    if moe.capacity_factor is not None:
        raise ConfigError(
            f"moe.capacity_factor={moe.capacity_factor}: no Hugging Face class drops tokens over capacity (the "
            "nearest, Qwen2MoeForCausalLM, is dropless); export a run trained with moe.capacity_factor=null"
        )
    if moe.routing not in HF_ROUTINGS:
        raise ConfigError(
            f"moe.routing={moe.routing!r}: export computes only {HF_ROUTINGS} (Qwen2MoeForCausalLM); the nearest "
            "class for sigmoid scores with a selection bias is Glm4MoeForCausalLM, which this export does not write"
        )
    if moe.topk_scaling_factor != 1:
        raise ConfigError(
            f"moe.topk_scaling_factor={moe.topk_scaling_factor}: Mixtral and Qwen2MoeForCausalLM weight the experts "
            "by the router's probabilities unscaled (the nearest class with a routed scaling factor, "
            "Glm4MoeForCausalLM, is not written by this export)"
        )
    if moe.load_balancing == "expert_bias":
        raise ConfigError(
            "moe.load_balancing='expert_bias': the learned selection bias changes which experts a token uses, and "
            "Mixtral / Qwen2MoeForCausalLM have none (the nearest class with one, Glm4MoeForCausalLM, is not "
            "written by this export)"
        )


def _base_config(model: Decoder) -> dict:
    c = model.cfg
    return {
        "vocab_size": c.vocab_size,
        "hidden_size": c.d_model,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "intermediate_size": c.d_ff,
        "max_position_embeddings": c.max_seq_len,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "tie_word_embeddings": c.tie_embeddings,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "torch_dtype": "float32",
    }


def hf_config(model: Decoder, moe: MoEConfig | None):
    import transformers

    name = hf_class(model, moe)
    kw = _base_config(model)
    layers = list(getattr(model, "moe_layers", []) or [])
    if name == "MixtralForCausalLM":
        kw.update(_mixtral_moe_kwargs(moe, model.cfg.d_ff), sliding_window=None)
        return name, transformers.MixtralConfig(**kw)
    if name == "Qwen2MoeForCausalLM":
        kw.update(
            num_experts=moe.num_experts,
            num_experts_per_tok=moe.top_k,
            moe_intermediate_size=model.cfg.d_ff // moe.granularity,
            shared_expert_intermediate_size=moe.shared_experts * (model.cfg.d_ff // moe.granularity) or 1,
            norm_topk_prob=moe.routing == "topk_softmax" or moe.norm_topk_prob,
            decoder_sparse_step=1,
            use_sliding_window=False,
            mlp_only_layers=[i for i in range(model.cfg.n_layers) if i not in layers],
            router_aux_loss_coef=moe.aux_loss_coef,
            qkv_bias=True,
        )
        return name, transformers.Qwen2MoeConfig(**kw)
    if name == "Qwen2ForCausalLM":
        return name, transformers.Qwen2Config(**kw, use_sliding_window=False)
    return name, transformers.LlamaConfig(**kw, attention_bias=False, mlp_bias=False)


def _mixtral_moe_kwargs(moe: MoEConfig, d_ff: int) -> dict:
    return dict(
        num_local_experts=moe.num_experts,
        num_experts_per_tok=moe.top_k,
        router_aux_loss_coef=moe.aux_loss_coef,
        intermediate_size=d_ff // moe.granularity,
    )


def hf_moe_state_dict(sd: dict[str, torch.Tensor], src: str = "", dst: str = "") -> dict[str, torch.Tensor]:
    """One MoE layer's weights (keys ``src`` + ours) under the HF block's names (``dst`` + theirs)."""
    return {dst + theirs: sd[src + ours] for ours, theirs in MOE_TO_HF.items()}


def mixtral_moe_block(layer: MoE, experts_implementation: str = "grouped_mm"):
    """transformers' ``MixtralSparseMoeBlock`` holding a copy of ``layer``'s weights (same device and dtype).

    It computes ``layer``'s output when ``layer`` routes ``topk_softmax`` (Mixtral's router: softmax over all
    experts, top-T, renormalised) for any granularity: G only sets the expert width. Its router has no aux
    loss and takes [batch, seq, d] input. ``experts_implementation`` picks the experts' forward (transformers'
    ``ExpertsInterface``, read from its config at each call: "eager" loops over the experts, "grouped_mm" is one
    grouped GEMM per projection; under torch.compile it falls back to a loop unless the weights are bf16)."""
    import transformers
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    if layer.activation != "swiglu" or layer.cfg.routing != "topk_softmax":
        raise ConfigError(
            f"activation={layer.activation!r}, routing={layer.cfg.routing!r}: Mixtral's block computes only "
            "swiglu experts routed topk_softmax"
        )
    if layer.cfg.shared_experts or layer.cfg.capacity_factor is not None:
        raise ConfigError(
            f"moe.shared_experts={layer.cfg.shared_experts}, moe.capacity_factor={layer.cfg.capacity_factor}: "
            "Mixtral's block has no shared expert and drops no tokens"
        )
    ex = layer.experts
    config = transformers.MixtralConfig(
        hidden_size=ex.d_model,
        hidden_act="silu",
        experts_implementation=experts_implementation,
        **_mixtral_moe_kwargs(layer.cfg, ex.d_expert * layer.cfg.granularity),
    )
    w = layer.router.weight
    with torch.device(w.device):
        block = MixtralSparseMoeBlock(config).to(w.dtype)
    block.load_state_dict(hf_moe_state_dict(layer.state_dict()), strict=True)
    return block


def hf_state_dict(model: Decoder, name: str) -> dict[str, torch.Tensor]:
    """Our weights under the HF class's in-memory names (experts stacked, [gate; up] rows as ours)."""
    sd = model.state_dict()
    out = {
        "model.embed_tokens.weight": sd["embed.weight"],
        "model.norm.weight": sd["norm.weight"],
        "lm_head.weight": sd["lm_head.weight"],
    }
    layers = set(getattr(model, "moe_layers", []) or [])
    for i in range(model.cfg.n_layers):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = sd[src + "attn_norm.weight"]
        out[dst + "post_attention_layernorm.weight"] = sd[src + "mlp_norm.weight"]
        for p in "qkvo":
            out[dst + f"self_attn.{p}_proj.weight"] = sd[src + f"attn.{p}_proj.weight"]
            if p != "o" and name in ("Qwen2MoeForCausalLM", "Qwen2ForCausalLM"):
                w = sd[src + f"attn.{p}_proj.weight"]
                out[dst + f"self_attn.{p}_proj.bias"] = sd.get(src + f"attn.{p}_proj.bias", torch.zeros(w.shape[0]))
        if i in layers:
            out.update(hf_moe_state_dict(sd, src + "mlp.", dst + "mlp."))
            if name == "Qwen2MoeForCausalLM" and src + "mlp.shared.fc1.weight" in sd:
                out.update(_qwen2moe_shared(sd, src + "mlp.shared.", dst + "mlp."))
            elif name == "Qwen2MoeForCausalLM":  # its shared expert, zeroed: adds nothing
                d = model.cfg.d_model
                for proj, shape in (("gate_proj", (1, d)), ("up_proj", (1, d)), ("down_proj", (d, 1))):
                    out[dst + f"mlp.shared_expert.{proj}.weight"] = torch.zeros(shape)
                out[dst + "mlp.shared_expert_gate.weight"] = torch.zeros(1, d)
        else:
            gate, up = sd[src + "mlp.fc1.weight"].chunk(2)
            out[dst + "mlp.gate_proj.weight"], out[dst + "mlp.up_proj.weight"] = gate, up
            out[dst + "mlp.down_proj.weight"] = sd[src + "mlp.fc2.weight"]
    return out


def _qwen2moe_shared(sd: dict[str, torch.Tensor], src: str, dst: str) -> dict[str, torch.Tensor]:
    """Our shared experts (one MLP) as Qwen2-MoE's shared expert: its gate weights zero, so sigmoid(0) = 1/2
    scales its output, and its down-projection is ours doubled."""
    gate, up = sd[src + "fc1.weight"].chunk(2)
    down = sd[src + "fc2.weight"]
    return {
        dst + "shared_expert.gate_proj.weight": gate,
        dst + "shared_expert.up_proj.weight": up,
        dst + "shared_expert.down_proj.weight": 2 * down,
        dst + "shared_expert_gate.weight": torch.zeros(1, down.shape[0], dtype=down.dtype),
    }


def export_model(
    model: Decoder, moe: MoEConfig | None, out_dir: str | Path, tokenizer: str | Path | None = None
) -> str:
    """Save ``model`` as an HF checkpoint folder (config.json + safetensors); returns the class name."""
    import transformers

    name, config = hf_config(model, moe)
    with torch.device("meta"):
        hf = getattr(transformers, name)(config)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in hf_state_dict(model, name).items()}
    missing = set(hf.state_dict()) - set(state)
    if missing:
        raise RuntimeError(f"export to {name}: no value for {sorted(missing)[:5]}")
    hf.load_state_dict(state, strict=True, assign=True)
    hf.save_pretrained(out_dir)
    if tokenizer is not None and (Path(tokenizer) / "tokenizer.json").exists():
        from transformers import PreTrainedTokenizerFast

        PreTrainedTokenizerFast(tokenizer_file=str(Path(tokenizer) / "tokenizer.json")).save_pretrained(out_dir)
    _one_mode(Path(out_dir))
    return name


def _one_mode(folder: Path) -> None:
    """Every exported file gets the mode a new file gets here (0666 less the umask): safetensors writes its
    file 0600, the tokenizer and config files are 0644."""
    mask = os.umask(0)
    os.umask(mask)
    for f in folder.rglob("*"):
        if f.is_file():
            f.chmod(0o666 & ~mask)


def unfinished(run_dir: Path) -> str | None:
    """Why a run folder holds no finished run (None when its results.json says complete)."""
    path = run_dir / "results.json"
    try:
        res = json.loads(path.read_text())
    except FileNotFoundError:
        return "has no results.json (still training, killed, or never started)"
    except (OSError, ValueError) as e:
        return f"has an unreadable results.json ({type(e).__name__})"
    if res.get("status") != "complete":
        where = f" at step {res['steps']}" if res.get("steps") is not None else ""
        return f"is not finished (status {res.get('status', 'unknown')}{where})"
    return None


def _base_state(run: Path, cfg) -> dict:
    """A ``method=pretrain`` run's weights: the dense base it records, in the cache it ran with."""
    key = json.loads((run / "results.json").read_text()).get("dense_base") if (run / "results.json").exists() else None
    path = Path(cfg.paths.cache_dir) / "dense" / str(key) / "model.pt"
    if key is None or not path.exists():
        raise ConfigError(
            f"{run} is a method=pretrain run: its weights are the dense base {path}, which is missing (run it again, "
            "from the folder and with the UPCYCLE_CACHE it ran with)"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def load_run(run_dir: str | Path) -> tuple[Decoder, MoEConfig | None, dict]:
    """The trained model of a finished run folder (its resolved config + ``checkpoints/last.ckpt``, or the
    ``weights.pt`` a run without checkpoints keeps for its eval stage)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from harness.upcycle import upcycle
    from harness.weights import WEIGHTS, trained_state

    run = Path(run_dir)
    cfg_path = run / "config_resolved.yaml"
    if not cfg_path.exists():
        raise ConfigError(f"{cfg_path} is missing: export needs a run folder with a trained checkpoint")
    cfg = OmegaConf.load(cfg_path)
    state = trained_state(run) if cfg.method != "pretrain" else _base_state(run, cfg)
    if state is None:
        raise ConfigError(
            f"{run / 'checkpoints' / 'last.ckpt'} is missing (and no {WEIGHTS}): export needs a run folder with a "
            "trained checkpoint (train.save_checkpoints=true, or eval.tasks set)"
        )
    model = Decoder(instantiate(cfg.model))
    moe = None
    if cfg.method == "upcycle":
        moe = instantiate(cfg.moe)
        recipe = dataclasses.replace(instantiate(cfg.upcycle), router_start="fixed")  # no calibration batch needed:
        model = upcycle(model, moe, recipe)  # only the structure, the weights come from the ckpt
    model.load_state_dict(state)
    return model.eval(), moe, OmegaConf.to_container(cfg)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Export a run's trained model as a Hugging Face checkpoint")
    ap.add_argument("run_dir")
    ap.add_argument("out_dir")
    ap.add_argument(
        "--allow-partial",
        action="store_true",
        help="export an unfinished or failed run's last checkpoint anyway (recorded in config.json)",
    )
    args = ap.parse_args(argv)
    for name in ("run_dir", "out_dir"):
        if not getattr(args, name).strip():
            raise SystemExit(f"export error: {name} is empty: give a run folder and an output folder")
    if not Path(args.run_dir).is_dir():
        raise SystemExit(f"export error: {args.run_dir} is not a run folder (no such directory)")
    why = unfinished(Path(args.run_dir))
    if why is not None and not args.allow_partial:
        raise SystemExit(
            f"export error: {args.run_dir} {why}: export only finished runs (--allow-partial exports anyway)"
        )
    try:
        model, moe, cfg = load_run(args.run_dir)
        name = export_model(model, moe, args.out_dir, tokenizer=_tokenizer_dir(cfg))
    except ConfigError as e:
        raise SystemExit(f"export error: {e}") from None
    if why is not None:  # the exported config says it is not a finished run's model
        path = Path(args.out_dir) / "config.json"
        config = json.loads(path.read_text())
        config["upcycle_partial_export"] = f"{args.run_dir} {why}"
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    print(json.dumps({"class": name, "out_dir": args.out_dir, "partial": why is not None}))


def _tokenizer_dir(cfg: dict) -> str | None:
    """The run's tokenizer: the checkpoint's own, or the BPE trained for the corpus shards."""
    if cfg["model"].get("hf_path"):
        return cfg["model"]["hf_path"]
    from harness.data import TokenDataModule

    data = TokenDataModule(**{k: v for k, v in cfg["data"].items() if k != "_target_"})
    return str(data.prepare())  # the cached shards (rebuilt identically if the cache was cleared)


if __name__ == "__main__":
    main()
