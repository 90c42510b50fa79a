"""Lightning strategies configured for our Decoder (the Trainer config instantiates these)."""

from __future__ import annotations

from lightning.pytorch.strategies import FSDPStrategy

from harness.model import Block


def fsdp(sharding_strategy: str = "FULL_SHARD", state_dict_type: str = "full", cpu_offload: bool = False,
         limit_all_gathers: bool = True) -> FSDPStrategy:
    """FSDP with one unit per transformer block (dense or MoE): each block's weights, experts
    included, are gathered just for its own forward/backward, so peak memory is one block's full
    parameters plus everything else sharded. ``state_dict_type=full`` writes ordinary checkpoints
    (rank 0 gathers); ``sharded`` writes one shard per rank (faster for very large models)."""
    return FSDPStrategy(auto_wrap_policy={Block}, sharding_strategy=sharding_strategy,
                        state_dict_type=state_dict_type, cpu_offload=cpu_offload, limit_all_gathers=limit_all_gathers)
