"""Gated DeltaNet (GDN) mixer, with the reference's flat QKVZ layout."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.model.batch import RowGroup
from workers.model.config import GdnConfig, cache_shape
from workers.model.layers import DepthwiseConv, GatedRMSNorm, activation, cast, fp32, project
from workers.model.recurrent import causal_conv, delta_rule


class GatedDeltaNet(nn.Module):
    def __init__(self, hidden_size: int, config: GdnConfig, kernels=None):
        super().__init__()
        self.config = config
        self.value_heads, self.key_heads = config.value_heads, config.key_heads
        self.key_head_dim, self.value_head_dim = config.key_head_dim, config.value_head_dim
        self.key_dim = self.key_heads * self.key_head_dim
        self.value_dim = self.value_heads * self.value_head_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim  # q, k, v (z is not convolved)
        self.in_proj_qkvz = nn.Linear(hidden_size, 2 * self.key_dim + 2 * self.value_dim, bias=False)
        self.in_proj_ba = nn.Linear(hidden_size, 2 * self.value_heads, bias=False)
        self.convolution = DepthwiseConv(self.conv_dim, config.conv_kernel)
        self.out_proj = nn.Linear(self.value_dim, hidden_size, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(self.value_heads))
        self.A_log = nn.Parameter(torch.zeros(self.value_heads))
        self.norm = GatedRMSNorm(self.value_head_dim, config.norm_eps)
        self.conv_activation = activation(config.conv_activation)
        self.kernels = kernels
        self.cache_shape, self.conv_split = cache_shape(config), (self.conv_dim,)

    def forward(self, x: torch.Tensor, group: RowGroup) -> torch.Tensor:
        tokens = x.shape[0]
        projected = project(x, self.in_proj_qkvz, self.in_proj_ba)  # q | k | v | z | b | a
        slots = None if group.cache is None else group.cache.arena.states(self.cache_shape, self.conv_split)
        fused = getattr(self.kernels, "gdn_decode", None)  # the CPU kernels: the rest of the layer in one call
        if fused is not None and slots is not None and group.is_decode and self.kernels.supports(group):
            o = fused(self, projected, group, slots)
            if o is not None:
                return self.out_proj(o)
        qkv, z, b, a = projected.split([self.conv_dim, self.value_dim, self.value_heads, self.value_heads], dim=-1)
        qkv = self.conv_activation(causal_conv(self.convolution, qkv, group, slots, 0, self.kernels))
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = q.reshape(tokens, self.key_heads, self.key_head_dim)
        k = k.reshape(tokens, self.key_heads, self.key_head_dim)
        v = v.reshape(tokens, self.value_heads, self.value_head_dim)
        if self.value_heads != self.key_heads:  # value head j reads key head j // (HV / HK)
            repeat = self.value_heads // self.key_heads
            q, k = q.repeat_interleave(repeat, dim=1), k.repeat_interleave(repeat, dim=1)
        beta = b.sigmoid()
        g = -fp32(self.A_log).exp() * F.softplus(fp32(a) + fp32(self.dt_bias))
        o = delta_rule(q, k, v, g, beta, group, slots, self.kernels)
        o = self.norm(o, z.reshape(tokens, self.value_heads, self.value_head_dim))
        return self.out_proj(cast(o, x.dtype).reshape(tokens, self.value_dim))
