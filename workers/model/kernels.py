"""flash-linear-attention kernels for GDN and KDA on CUDA: chunked for prefill, fused-recurrent for decode.

Chosen automatically when the model is on a CUDA device and fla imports (its
triton kernels do not run on a CPU). Prefill rows of a group run as one
variable-length call (``cu_seqlens``), decode rows as one batched call.
"""

from __future__ import annotations

import logging

import torch

from workers.model.batch import RowGroup

log = logging.getLogger(__name__)


class FlaKernels:
    def __init__(self):
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
        from fla.ops.kda import chunk_kda, fused_recurrent_kda

        self._chunk = {False: chunk_gated_delta_rule, True: chunk_kda}
        self._recurrent = {False: fused_recurrent_gated_delta_rule, True: fused_recurrent_kda}

    def delta_rule(self, q, k, v, g, beta, states, group: RowGroup, scale: float):
        """Same contract as ``recurrent.delta_rule``'s torch path; returns (o fp32 [T, H, dv], final states)."""
        per_channel = g.dim() == 3  # KDA: one decay per key channel
        common = dict(scale=scale, initial_state=states, output_final_state=True, use_qk_l2norm_in_kernel=True)
        if group.is_decode:
            out, final = self._recurrent[per_channel](q[:, None], k[:, None], v[:, None], g=g[:, None],
                                                      beta=beta[:, None], **common)
            return out[:, 0].float(), final
        lengths = torch.tensor([0] + [row.length for row in group.rows], device=q.device)
        cu_seqlens = lengths.cumsum(0)
        out, final = self._chunk[per_channel](q[None], k[None], v[None], g=g[None], beta=beta[None],
                                              cu_seqlens=cu_seqlens, **common)
        return out[0].float(), final


def select_kernels(device: torch.device, required: bool = False) -> FlaKernels | None:
    """fla's kernels on a CUDA device, None (plain torch) otherwise."""
    if device.type != "cuda":
        if required:
            raise RuntimeError("fla kernels need a CUDA device")
        return None
    try:
        return FlaKernels()
    except ImportError as exc:
        if required:
            raise
        log.warning("flash-linear-attention is not importable (%s): GDN/KDA run the slow plain-torch path", exc)
        return None
