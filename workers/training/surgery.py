"""Start a supernet from its all-attention teacher, as Fast-LLM's conversion does.

Embeddings, MLPs, norms and head are copied (and stay frozen in training).
Both attention mixers take the teacher's attention. GDN and KDA start from the
teacher's projections ("DIL": Q/K/V/O map onto theirs, head by head), with
identity short convolutions, a slow decay (about a 10-token half-life), beta
at 1/2 and a closed output gate, so each starts as a quiet linear attention
that distillation then opens up.
"""

from __future__ import annotations

import math

import torch

from policies.placement import Mixer
from workers.model.attention import Attention
from workers.model.gdn import GatedDeltaNet
from workers.model.kda import KimiDeltaAttention
from workers.model.layers import DepthwiseConv
from workers.model.supernet import SupernetLM

SLOW_DECAY_A_LOG = math.log(0.1)  # decay exp(-0.1 * softplus(0)) = 2^(-1/10) per token: a 10-token half-life


def init_from_teacher(supernet: SupernetLM, teacher: SupernetLM, generator: torch.Generator, std: float = 0.02) -> None:
    teacher_state = teacher.state_dict()
    with torch.no_grad():
        for name, tensor in supernet.state_dict().items():
            if ".mixer." not in name:
                tensor.copy_(teacher_state[name])
        for student, source in zip(supernet.blocks, teacher.blocks):
            attention: Attention = source.by_kind[Mixer.ATTENTION]
            for kind in (Mixer.ATTENTION, Mixer.SLIDING_WINDOW):
                student.by_kind[kind].load_state_dict(attention.state_dict())
            _gdn_from_attention(student.by_kind[Mixer.GDN], attention)
            _kda_from_attention(student.by_kind[Mixer.KDA], attention, generator, std)


def _heads(weight: torch.Tensor, size: int, index: list[int]) -> torch.Tensor:
    """Rows of the given heads of a [heads * size, hidden] projection, in that order."""
    return torch.cat([weight[h * size:(h + 1) * size] for h in index])


def _identity_conv(conv: DepthwiseConv) -> None:
    conv.weight.zero_()
    conv.weight[:, 0, -1] = 1.0  # the last tap multiplies the current token


def _gdn_from_attention(gdn: GatedDeltaNet, attention: Attention) -> None:
    size, group = attention.head_size, attention.heads // attention.kv_heads
    if (gdn.key_heads, gdn.value_heads, gdn.key_head_dim, gdn.value_head_dim) != (attention.kv_heads, attention.heads, size, size):
        raise ValueError("GDN heads must mirror attention's (key heads = KV groups, value heads = query heads)")
    q = _heads(attention.q_proj.weight, size, [g * group for g in range(gdn.key_heads)])  # each group's first query
    k = attention.k_proj.weight
    v = _heads(attention.v_proj.weight, size, [j // group for j in range(gdn.value_heads)])  # value head j: its group's V
    z = torch.zeros_like(v)
    gdn.in_proj_qkvz.weight.copy_(torch.cat([q, k, v, z]))
    gdn.in_proj_ba.weight.zero_()
    gdn.out_proj.weight.copy_(attention.o_proj.weight)
    _identity_conv(gdn.convolution)
    gdn.A_log.fill_(SLOW_DECAY_A_LOG)
    gdn.dt_bias.zero_()
    gdn.norm.weight.fill_(1.0)


def _kda_from_attention(kda: KimiDeltaAttention, attention: Attention, generator: torch.Generator, std: float) -> None:
    size, group = attention.head_size, attention.heads // attention.kv_heads
    if (kda.heads, kda.head_dim) != (attention.heads, size):
        raise ValueError("KDA heads must mirror attention's query heads")
    per_query = [h // group for h in range(kda.heads)]
    kda.q_proj.weight.copy_(attention.q_proj.weight)
    kda.k_proj.weight.copy_(_heads(attention.k_proj.weight, size, per_query))
    kda.v_proj.weight.copy_(_heads(attention.v_proj.weight, size, per_query))
    kda.o_proj.weight.copy_(attention.o_proj.weight)
    for conv in (kda.q_conv, kda.k_conv, kda.v_conv):
        _identity_conv(conv)
    for linear in (kda.f_a_proj, kda.f_b_proj, kda.g_a_proj, kda.g_b_proj):
        linear.weight.normal_(0.0, std, generator=generator)
    kda.beta_proj.weight.zero_()
    kda.A_log.fill_(SLOW_DECAY_A_LOG)
    kda.dt_bias.zero_()
    kda.norm.weight.fill_(1.0)
