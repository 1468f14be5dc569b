"""The supernet language model: every layer holds several mixers; each row of a batch runs its own placement.

    h = embed(tokens)
    for each block:  h = h + mixer_of_row(norm(h));  h = h + mlp(norm(h))
    logits = lm_head(norm(h))

Module and parameter names are the checkpoint's, so ``state_dict()`` keys are
the safetensors names (``model.decoder.blocks.3.mixer.mixers.gdn.A_log``).
"""

from __future__ import annotations

import torch
from torch import nn

from policies.errors import InvalidPlacement
from policies.placement import Mixer, Placement
from workers.model.attention import Attention
from workers.model.batch import ForwardBatch, RowGroup
from workers.model.config import AttentionConfig, GdnConfig, LayerConfig, SupernetConfig
from workers.model.gdn import GatedDeltaNet
from workers.model.kda import KimiDeltaAttention
from workers.model.layers import GatedMLP, RMSNorm, Rotary


def build_mixer(hidden_size: int, config) -> nn.Module:
    if isinstance(config, AttentionConfig):
        return Attention(hidden_size, config)
    if isinstance(config, GdnConfig):
        return GatedDeltaNet(hidden_size, config)
    return KimiDeltaAttention(hidden_size, config)


class StochasticMixer(nn.Module):
    """Holds a layer's sub-mixers under their checkpoint names (``mixer.mixers.{name}``)."""

    def __init__(self, modules: dict[str, nn.Module]):
        super().__init__()
        self.mixers = nn.ModuleDict(modules)


class Block(nn.Module):
    def __init__(self, hidden_size: int, config: LayerConfig, norm_eps: float):
        super().__init__()
        modules = {mixer: build_mixer(hidden_size, c) for mixer, c in config.mixers.items()}
        if all(name.startswith("mixer.mixers.") for name in config.tensor_names.values()):
            self.mixer = StochasticMixer({config.tensor_names[m].rsplit(".", 1)[1]: mod for m, mod in modules.items()})
        else:
            (self.mixer,) = modules.values()
        self.by_kind: dict[Mixer, nn.Module] = modules  # plain dict: dispatch only, registered above
        self.mlp = GatedMLP(hidden_size, config.mlp.intermediate_size, config.mlp.activation)
        self.input_layernorm = RMSNorm(hidden_size, norm_eps)
        self.post_attention_layernorm = RMSNorm(hidden_size, norm_eps)

    def forward(self, h: torch.Tensor, groups: dict[Mixer, RowGroup]) -> torch.Tensor:
        x = self.input_layernorm(h)
        if len(groups) == 1:
            ((mixer, group),) = groups.items()
            mixed = self.by_kind[mixer](x, group)
        else:
            mixed = torch.empty_like(x)
            for mixer, group in groups.items():
                mixed[group.token_index] = self.by_kind[mixer](x[group.token_index], group)
        h = h + mixed
        return h + self.mlp(self.post_attention_layernorm(h))


class Decoder(nn.Module):
    def __init__(self, config: SupernetConfig):
        super().__init__()
        self.blocks = nn.ModuleList(Block(config.hidden_size, layer, config.norm_eps) for layer in config.layers)


class TextModel(nn.Module):
    def __init__(self, config: SupernetConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.decoder = Decoder(config)
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)


class SupernetLM(nn.Module):
    def __init__(self, config: SupernetConfig):
        super().__init__()
        self.config = config
        self.model = TextModel(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.decoder.blocks

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def use_kernels(self, kernels) -> None:
        """Route decode attention and GDN/KDA through ``kernels`` (Triton and fla on CUDA: ``kernels.py``),
        or the plain-torch paths with None."""
        for module in self.modules():
            if isinstance(module, (Attention, GatedDeltaNet, KimiDeltaAttention)):
                module.kernels = kernels

    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers (rotary frequencies) on the model's device after a meta-device load."""
        for module in self.modules():
            if isinstance(module, Attention):
                module.rotary = Rotary(module.head_size, module.config.rotary_theta).to(self.device)

    def check_placement(self, placement: Placement) -> None:
        if len(placement) != len(self.blocks):
            raise InvalidPlacement(f"placement {placement.code} has {len(placement)} layers, the model {len(self.blocks)}")
        for i, (block, mixer) in enumerate(zip(self.blocks, placement)):
            if mixer not in block.by_kind:
                raise InvalidPlacement(f"layer {i} has no {mixer.value} mixer")

    def forward(self, batch: ForwardBatch, all_logits: bool = False) -> torch.Tensor:
        """Logits at each row's last new token ([rows, vocab]), at ``batch.logit_index`` when it is set (a
        verify row's positions, ``workers/engine/speculation.py``), or at every token ([tokens, vocab]).

        With ``batch.cache``, each row continues from its ``start`` cached tokens and its new tokens are
        written to the pool; the caller owns the count (the engine's ``Sequence.num_computed``). A cached
        forward is inference only: it records no autograd history (the pool outlives every step)."""
        if batch.cache is not None and torch.is_grad_enabled():
            with torch.no_grad():
                return self.forward(batch, all_logits)
        h = self.model.embed_tokens(batch.token_ids)
        for i, block in enumerate(self.blocks):
            h = block(h, batch.groups(i))
        last = batch.last_token_index() if batch.logit_index is None else batch.logit_index
        h = self.model.norm(h if all_logits or last is None else h[last])
        return h @ self.head_weight.t()
