"""Let torch.compile's on-disk AOT-autograd cache keep the MoE's graphs, so that a new process (a sweep job, a
launcher worker) loads them instead of tracing and partitioning them again.

torch (2.11-2.13) bypasses that cache for any graph holding a custom ``autograd.Function`` (our dispatch,
combine and mixed-precision router) or an autocast region (the router's fp32 logits), because it cannot
prove by default that its key covers them. Dynamo traces both halves of such a Function, and the autocast
arguments, into the graph that the key hashes, so a changed ``backward`` gets a new key
(``tests/test_compile_cache.py`` checks this in fresh processes). The FX-graph cache hits either way.
"""

import torch
import torch._functorch.config
import torch._inductor.config

# the autocast region's enter and exit, keyed by the torch version that traced them
_AUTOCAST_FUNCTIONS = ("torch.amp.autocast_mode._enter_autocast", "torch.amp.autocast_mode._exit_autocast")


def share_compiled_graphs() -> None:
    """Allow the AOT-autograd cache to store and load graphs with custom Functions and autocast regions."""
    torch._functorch.config.autograd_cache_allow_custom_autograd_functions = True
    marked = dict(torch._inductor.config.unsafe_marked_cacheable_functions)
    marked.update({name: torch.__version__ for name in _AUTOCAST_FUNCTIONS})
    torch._inductor.config.unsafe_marked_cacheable_functions = marked
