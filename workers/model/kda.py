"""Kimi Delta Attention (KDA) mixer: the delta rule with a per-channel decay and separate q/k/v convolutions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.model.batch import RowGroup
from workers.model.config import KdaConfig, cache_shape
from workers.model.layers import DepthwiseConv, GatedRMSNorm, cast, fp32, project
from workers.model.recurrent import causal_conv, delta_rule


class KimiDeltaAttention(nn.Module):
    def __init__(self, hidden_size: int, config: KdaConfig, kernels=None):
        super().__init__()
        self.config = config
        self.heads, self.head_dim = config.heads, config.head_dim
        size = self.heads * self.head_dim
        self.q_proj = nn.Linear(hidden_size, size, bias=False)
        self.k_proj = nn.Linear(hidden_size, size, bias=False)
        self.v_proj = nn.Linear(hidden_size, size, bias=False)
        self.q_conv = DepthwiseConv(size, config.conv_kernel)
        self.k_conv = DepthwiseConv(size, config.conv_kernel)
        self.v_conv = DepthwiseConv(size, config.conv_kernel)
        self.f_a_proj = nn.Linear(hidden_size, self.head_dim, bias=False)
        self.f_b_proj = nn.Linear(self.head_dim, size, bias=False)
        self.g_a_proj = nn.Linear(hidden_size, self.head_dim, bias=False)
        self.g_b_proj = nn.Linear(self.head_dim, size, bias=False)
        self.beta_proj = nn.Linear(hidden_size, self.heads, bias=False)
        self.o_proj = nn.Linear(size, hidden_size, bias=False)
        self.A_log = nn.Parameter(torch.zeros(self.heads))
        self.dt_bias = nn.Parameter(torch.ones(size))
        self.norm = GatedRMSNorm(self.head_dim, config.norm_eps, config.norm_activation)
        self.kernels = kernels
        self.cache_shape, self.conv_split = cache_shape(config), (size,) * 3

    def forward(self, x: torch.Tensor, group: RowGroup) -> torch.Tensor:
        tokens, shape = x.shape[0], (x.shape[0], self.heads, self.head_dim)
        slots = None if group.cache is None else group.cache.arena.states(self.cache_shape, self.conv_split)
        size = self.heads * self.head_dim
        projected = project(x, self.q_proj, self.k_proj, self.v_proj, self.beta_proj, self.f_a_proj, self.g_a_proj)
        q, k, v, beta, f, gate = projected.split([size] * 3 + [self.heads] + [self.head_dim] * 2, dim=-1)
        f, gate = self.f_b_proj(f), self.g_b_proj(gate)
        fused = getattr(self.kernels, "kda_decode", None)  # the CPU kernels: the rest of the layer in one call
        if fused is not None and slots is not None and group.is_decode and self.kernels.supports(group):
            o = fused(self, projected, f, gate, group, slots)  # q | k | v | beta read from ``projected``
            if o is not None:
                return self.o_proj(o)
        q = F.silu(causal_conv(self.q_conv, q, group, slots, 0, self.kernels)).reshape(shape)
        k = F.silu(causal_conv(self.k_conv, k, group, slots, 1, self.kernels)).reshape(shape)
        v = F.silu(causal_conv(self.v_conv, v, group, slots, 2, self.kernels)).reshape(shape)
        f = f.reshape(shape)
        g = -fp32(self.A_log).exp()[:, None] * F.softplus(fp32(f) + fp32(self.dt_bias).view(self.heads, self.head_dim))
        beta = fp32(beta).sigmoid()
        o = delta_rule(q, k, v, g, beta, group, slots, self.kernels)
        gate = gate.reshape(shape)
        o = self.norm(o, gate)
        return self.o_proj(cast(o, x.dtype).reshape(tokens, self.heads * self.head_dim))
