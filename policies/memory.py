"""Cache memory per sequence, as a function of placement and context length.

Pure arithmetic from the model's mixer shapes (no torch), so admission and
routing can size batches without loading a model. ``workers/`` builds a
``CacheMemoryModel`` from a checkpoint's config, and its caches hold exactly
these bytes (a test checks the two agree):

- attention: keys and values for every token of the context;
- sliding_window: keys and values for at most ``window`` tokens (a ring);
- gdn / kda: a fixed fp32 recurrent state per head plus the short
  convolution's last ``kernel - 1`` inputs per channel.
"""

from __future__ import annotations

from dataclasses import dataclass

from policies.errors import InvalidPlacement
from policies.placement import Mixer, Placement


@dataclass(frozen=True, slots=True)
class AttentionShape:
    kv_heads: int
    head_size: int
    window: int | None = None

    def token_bytes(self, kv_bytes: int) -> int:
        return 2 * self.kv_heads * self.head_size * kv_bytes

    def cache_bytes(self, context: int, kv_bytes: int, state_bytes: int) -> int:
        tokens = context if self.window is None else min(context, self.window)
        return tokens * self.token_bytes(kv_bytes)


@dataclass(frozen=True, slots=True)
class DeltaRuleShape:
    """GDN or KDA: ``heads`` states of ``key_dim x value_dim`` plus conv history over ``conv_channels``."""

    heads: int
    key_dim: int
    value_dim: int
    conv_channels: int
    conv_kernel: int

    def cache_bytes(self, context: int, kv_bytes: int, state_bytes: int) -> int:
        state = self.heads * self.key_dim * self.value_dim * state_bytes
        conv = self.conv_channels * (self.conv_kernel - 1) * kv_bytes
        return state + conv


MixerShape = AttentionShape | DeltaRuleShape


@dataclass(frozen=True, slots=True)
class CacheMemoryModel:
    """Per-layer mixer shapes plus the element sizes the caches are stored in.

    ``kv_bytes``: keys, values and conv history (the model's dtype: 2 for bf16, 4 for fp32).
    ``state_bytes``: recurrent states, kept in fp32 for accuracy.
    """

    layers: tuple[dict[Mixer, MixerShape], ...]
    kv_bytes: int = 2
    state_bytes: int = 4

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def layer_bytes(self, layer: int, mixer: Mixer, context: int) -> int:
        try:
            shape = self.layers[layer][mixer]
        except KeyError:
            raise InvalidPlacement(f"layer {layer} has no {mixer.value} mixer") from None
        return shape.cache_bytes(context, self.kv_bytes, self.state_bytes)

    def sequence_bytes(self, placement: Placement, context: int) -> int:
        """Bytes one sequence of ``context`` tokens holds under ``placement``."""
        if len(placement) != self.num_layers:
            raise InvalidPlacement(
                f"placement {placement.code} has {len(placement)} layers, the model {self.num_layers}"
            )
        return sum(self.layer_bytes(i, m, context) for i, m in enumerate(placement))

    def max_sequences(self, placement: Placement, context: int, budget_bytes: int) -> int:
        """How many sequences of this placement and context fit in ``budget_bytes``."""
        per_sequence = self.sequence_bytes(placement, context)
        return budget_bytes // per_sequence if per_sequence else 0

    def to_dict(self) -> dict:
        def shape_dict(shape: MixerShape) -> dict:
            kind = "attention" if isinstance(shape, AttentionShape) else "delta_rule"
            return {"kind": kind, **{f: getattr(shape, f) for f in shape.__slots__}}

        return {
            "kv_bytes": self.kv_bytes,
            "state_bytes": self.state_bytes,
            "layers": [{m.value: shape_dict(s) for m, s in layer.items()} for layer in self.layers],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "CacheMemoryModel":
        def shape(entry: dict) -> MixerShape:
            fields = {k: v for k, v in entry.items() if k != "kind"}
            return AttentionShape(**fields) if entry["kind"] == "attention" else DeltaRuleShape(**fields)

        layers = tuple({Mixer(name): shape(entry) for name, entry in layer.items()} for layer in data["layers"])
        return cls(layers=layers, kv_bytes=data["kv_bytes"], state_bytes=data["state_bytes"])
