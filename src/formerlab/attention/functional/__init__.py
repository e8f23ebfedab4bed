"""fla-compatible functional linear-attention ops in pure PyTorch.

The ops keep the names, arguments, defaults, layouts and return values of fla
(flash-linear-attention >= 0.6): ``q, k`` are ``[B, T, H, K]``, ``v`` is ``[B, T, H, V]``,
recurrent states are ``[N, H, K, V]`` and every op returns ``(o, final_state)``. How they
differ from fla:

- pure PyTorch: they run on any device torch runs on (CPU included), without Triton;
- float32 and float64: half-precision inputs are computed in float32 and the output is cast
  back to the dtype of ``v``; float64 inputs are computed in float64 (tests and gradcheck);
- autograd flows through every tensor input, ``initial_state`` included (first-order
  gradients; the chunked ops have hand-written backward passes);
- the ``chunk_*`` ops are chunked-parallel: quadratic inside a chunk, one state per chunk
  passed between chunks, so the backward pass stores per-chunk (not per-token) states.
  They are numerically stable for strong decays (only differences of cumulative log
  decays are exponentiated). The ``fused_recurrent_*`` ops are the token-by-token
  recurrence: the reference and the streaming step.
"""

from formerlab.attention.functional.delta_rule import (
    chunk_delta_rule,
    chunk_gated_delta_rule,
    fused_recurrent_delta_rule,
    fused_recurrent_gated_delta_rule,
)
from formerlab.attention.functional.gla import (
    chunk_gla,
    chunk_simple_gla,
    fused_recurrent_gla,
    fused_recurrent_simple_gla,
)
from formerlab.attention.functional.retention import (
    chunk_retention,
    fused_recurrent_retention,
    retention_log_decay,
)
from formerlab.attention.functional.ssd import ssd, ssd_recurrent

__all__ = [
    "chunk_delta_rule",
    "chunk_gated_delta_rule",
    "chunk_gla",
    "chunk_retention",
    "chunk_simple_gla",
    "fused_recurrent_delta_rule",
    "fused_recurrent_gated_delta_rule",
    "fused_recurrent_gla",
    "fused_recurrent_retention",
    "fused_recurrent_simple_gla",
    "retention_log_decay",
    "ssd",
    "ssd_recurrent",
]
