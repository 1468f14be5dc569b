"""Kimi Delta Attention (KDA) mixer: the delta rule with a per-channel decay and separate q/k/v convolutions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.model.batch import RowGroup
from workers.model.cache import DeltaRuleCache
from workers.model.config import KdaConfig
from workers.model.layers import DepthwiseConv, GatedRMSNorm
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

    def new_cache(self, capacity: int, dtype: torch.dtype, device) -> DeltaRuleCache:
        size = self.heads * self.head_dim
        return DeltaRuleCache(self.heads, self.head_dim, self.head_dim, [size, size, size],
                              self.config.conv_kernel, dtype, device)

    def forward(self, x: torch.Tensor, group: RowGroup) -> torch.Tensor:
        tokens, shape = x.shape[0], (x.shape[0], self.heads, self.head_dim)
        q = F.silu(causal_conv(self.q_conv, self.q_proj(x), group, slot=0)).reshape(shape)
        k = F.silu(causal_conv(self.k_conv, self.k_proj(x), group, slot=1)).reshape(shape)
        v = F.silu(causal_conv(self.v_conv, self.v_proj(x), group, slot=2)).reshape(shape)
        f = self.f_b_proj(self.f_a_proj(x)).reshape(shape)
        g = -self.A_log.float().exp()[:, None] * F.softplus(f.float() + self.dt_bias.float().view(self.heads, self.head_dim))
        beta = self.beta_proj(x).float().sigmoid()
        o = delta_rule(q, k, v, g, beta, group, self.kernels)
        gate = self.g_b_proj(self.g_a_proj(x)).reshape(shape)
        o = self.norm(o, gate)
        return self.o_proj(o.to(x.dtype).reshape(tokens, self.heads * self.head_dim))
