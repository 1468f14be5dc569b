"""Small random-weight supernets in the real checkpoint layout, for tests and the CPU default."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from workers.model.config import parse_config, supernet_config_dict
from workers.model.gdn import GatedDeltaNet
from workers.model.kda import KimiDeltaAttention
from workers.model.layers import DepthwiseConv
from workers.model.loader import save_checkpoint
from workers.model.supernet import SupernetLM
from workers.model.tokenizer import stdlib_texts, train_bpe

TINY_SHAPE = dict(
    hidden_size=64, intermediate_size=128, heads=4, head_groups=2, head_size=16, window_size=16,
    gdn_value_heads=4, gdn_key_heads=2, gdn_key_head_dim=16, gdn_value_head_dim=16,
    kda_heads=4, kda_head_dim=16, max_position_embeddings=4096,
)


def init_weights(model: SupernetLM, generator: torch.Generator, std: float = 0.02) -> None:
    """Reference-style initialisation: normal linears/embeddings, unit norms, GDN/KDA gate parameters as Fast-LLM."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, DepthwiseConv):
                bound = 1 / math.sqrt(module.kernel)
                module.weight.uniform_(-bound, bound, generator=generator)
            if isinstance(module, GatedDeltaNet):
                module.A_log.copy_(torch.empty_like(module.A_log).uniform_(0, 16, generator=generator).clamp_min(1e-3).log())
                module.dt_bias.fill_(1.0)
            elif isinstance(module, KimiDeltaAttention):
                module.A_log.copy_(torch.empty_like(module.A_log).uniform_(1, 16, generator=generator).log())
                module.dt_bias.fill_(1.0)
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                param.fill_(1.0)


def make_tiny_checkpoint(out: str | Path, num_layers: int = 6, seed: int = 0, vocab_size: int = 2048,
                         window_size: int = 16, std: float = 0.1) -> Path:
    """Train a BPE on the Python standard library, build a random supernet around it and write both."""
    tokenizer = train_bpe(stdlib_texts(3_000_000), vocab_size)
    shape = {**TINY_SHAPE, "window_size": window_size}
    raw = supernet_config_dict(num_layers=num_layers, vocab_size=tokenizer.vocab_size,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=3, **shape)
    model = SupernetLM(parse_config(raw))
    init_weights(model, torch.Generator().manual_seed(seed), std=std)
    out = Path(out)
    tokenizer.save(out)
    return save_checkpoint(model, out)
