"""Building blocks shared by the mixers: norms, the gated MLP, rotary embeddings, short convolutions.

Numerics follow the reference (Fast-LLM's Apriel2 HF code): norms in fp32 and
cast back, rotary angles in fp32 with half-split pairing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "sigmoid": torch.sigmoid, "relu": F.relu}


def fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32 (no dispatch at all when it already is: a decode step is hundreds of small ops)."""
    return x if x.dtype == torch.float32 else x.float()


def cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if x.dtype == dtype else x.to(dtype)


def project(x: torch.Tensor, *linears: nn.Linear) -> torch.Tensor:
    """``torch.cat([linear(x) for linear in linears], -1)``. Without autograd (inference) it is one matmul:
    the first call moves the linears' weights into one tensor and leaves each linear a view of its rows, so
    no byte is held twice and a later ``load_state_dict`` (which copies in place) still reaches the fused
    weight; a linear whose weight was replaced (``.to()``, new ``.data``) fuses again. With autograd each
    linear runs as itself."""
    if torch.is_grad_enabled():
        return torch.cat([linear(x) for linear in linears], dim=-1)
    fused = linears[0].__dict__.get("_projection")
    if fused is None or fused[0] != _pointers(linears):
        fused = linears[0].__dict__["_projection"] = _fuse(linears)
    return F.linear(x, fused[1], fused[2])


def _pointers(linears) -> tuple:
    return tuple((m.weight.data_ptr(), None if m.bias is None else m.bias.data_ptr()) for m in linears)


@torch.inference_mode(False)  # the weights stay ordinary tensors, which training may use later
@torch.no_grad()
def _fuse(linears) -> tuple:
    weight = torch.cat([m.weight.detach() for m in linears])
    has_bias = any(m.bias is not None for m in linears)
    bias = torch.cat([m.weight.new_zeros(m.out_features) if m.bias is None else m.bias.detach()
                      for m in linears]) if has_bias else None
    start = 0
    for m in linears:
        rows = slice(start, start + m.out_features)
        m.weight.data = weight[rows]
        if m.bias is not None:
            m.bias.data = bias[rows]
        start += m.out_features
    return _pointers(linears), weight, bias


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r} (known: {', '.join(ACTIVATIONS)})") from None


class RMSNorm(nn.Module):
    """``weight * (x * rsqrt(mean(x^2) + eps))``, computed in fp32 and cast back before the weight."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 == self.weight.dtype:  # one fused op, the same arithmetic
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        x = fp32(x)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * cast(x, dtype)


class GatedRMSNorm(nn.Module):
    """Per-head RMSNorm of the mixer output, gated by ``act(gate)``; all in fp32 (fla's ``rms_norm_gated``)."""

    def __init__(self, size: int, eps: float, gate_activation: str = "silu"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.gate_activation = activation(gate_activation)

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = fp32(x)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * fp32(self.weight)
        return cast(x * self.gate_activation(fp32(gate)), dtype)


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "silu"):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DepthwiseConv(nn.Module):
    """Causal depthwise conv over channels; weight ``[channels, 1, kernel]`` as in the checkpoint.

    The last tap multiplies the current token. ``history`` holds the previous
    ``kernel - 1`` inputs (zeros at the start of a sequence).
    """

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel))
        self.kernel = kernel

    def forward(self, x: torch.Tensor, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` [batch, tokens, channels], ``history`` [batch, kernel-1, channels] -> (out, new history)."""
        window = torch.cat([cast(history, x.dtype), x], dim=1)  # [B, K-1+T, C]
        weight = self.weight[:, 0, :].t()  # [K, C]
        tokens = x.shape[1]
        # out[t] = sum_j window[t + j] * weight[j]: unfold along time, one multiply-add per tap.
        frames = window.unfold(1, self.kernel, 1)  # [B, T, C, K]
        out = torch.einsum("btck,kc->btc", frames, weight) if tokens > 1 else (window * weight).sum(1, keepdim=True)
        return out, window[:, -(self.kernel - 1):]


class Rotary(nn.Module):
    """Mistral-1d rotary embeddings: every dimension rotates, dim j pairs with j + head_size/2."""

    def __init__(self, head_size: int, theta: float):
        super().__init__()
        self.head_size, self.theta = head_size, theta  # what a step's cos/sin are cached by
        exponent = torch.arange(0, head_size, 2, dtype=torch.int64).float() / head_size
        self.register_buffer("inv_freq", 1.0 / (theta**exponent), persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and *signed* sin at ``positions`` [T, head_size]: sin's first half negated, so ``apply`` needs
        one roll instead of rotate_half's two slices, a negation and a concatenation."""
        angles = positions.float()[:, None] * fp32(self.inv_freq)[None, :]
        sin = angles.sin()
        return cast(torch.cat([angles, angles], dim=-1).cos(), dtype), cast(torch.cat([-sin, sin], dim=-1), dtype)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """``x`` [T, heads, head_size]: x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]."""
        half = x.shape[-1] // 2
        return x * cos[:, None, :] + x.roll(half, dims=-1) * signed_sin[:, None, :]


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(sum(x^2) + eps)`` over the last dim, as fla's in-kernel q/k norm."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)
