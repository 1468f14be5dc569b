"""Cache memory per sequence, as a function of placement and context length: exactly what the engine's pool holds.

Pure arithmetic from the model's mixer shapes (no torch), so admission and
routing can size batches without loading a model. The engine's cache pool
(``workers/engine/pool.py``) is one arena of equal *blocks*, and every cache
is a whole number of them (a test checks the pool against this file):

- attention: pages of ``page_tokens`` tokens' keys and values, enough for
  every token of the context (prompt + max_tokens, reserved at admission);
- sliding_window: a ring of pages holding the last ``window`` tokens (fewer
  when the whole context is shorter);
- gdn / kda: one block holding the fp32 recurrent state per head and the
  short convolutions' last ``kernel - 1`` inputs per channel.

A sequence that speculates (``speculative_tokens`` k > 0: a draft proposes k
tokens, the target verifies them, rejected ones are rolled back) holds more:
a sliding window's ring keeps k tokens of slack (rejected tokens overwrite
ring slots, never one the window still sees), and each recurrent layer a
second block, the snapshot its state is restored from after a rejection. The
draft placement's own caches follow the same rules (``speculative_bytes``).

A block must hold either, so its size is the larger of a page and a
recurrent slot; the page is made long enough (a multiple of 16 tokens) that
a page is at least a recurrent slot, so neither wastes much of a block. This
is vLLM's hybrid layout (attention pages sized to match the Mamba state):
with one block size, one free list serves every mixer, and a GDN-heavy mix
can use the bytes an attention-heavy one would. Super Apriel 15B in bf16:
544-token pages, 2.23 MB blocks (a GDN slot is 2.13 MB of it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from policies.errors import InvalidPlacement
from policies.placement import Mixer, Placement

PAGE_ALIGN_TOKENS = 16  # derived pages are a multiple of this many tokens
BLOCK_ALIGN_BYTES = 256  # blocks start on this boundary (every element type, and the GPU's allocation unit)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True, slots=True)
class AttentionShape:
    kv_heads: int
    head_size: int
    window: int | None = None

    def token_bytes(self, kv_bytes: int) -> int:
        return 2 * self.kv_heads * self.head_size * kv_bytes

    def held_tokens(self, context: int, speculative_tokens: int = 0) -> int:
        """Tokens whose keys and values a sequence of ``context`` tokens keeps (the ring for a window, with
        ``speculative_tokens`` of slack for tokens written ahead and rolled back)."""
        return context if self.window is None else min(context, self.window + speculative_tokens)

    def cache_bytes(self, context: int, kv_bytes: int, state_bytes: int) -> int:
        """Bytes of the tokens held (what a decode step reads), before rounding to pages."""
        return self.held_tokens(context) * self.token_bytes(kv_bytes)

    def num_blocks(self, context: int, page_tokens: int, speculative_tokens: int = 0) -> int:
        return _ceil_div(self.held_tokens(context, speculative_tokens), page_tokens)


@dataclass(frozen=True, slots=True)
class DeltaRuleShape:
    """GDN or KDA: ``heads`` states of ``key_dim x value_dim`` plus conv history over ``conv_channels``."""

    heads: int
    key_dim: int
    value_dim: int
    conv_channels: int
    conv_kernel: int

    def state_elements(self) -> int:
        return self.heads * self.key_dim * self.value_dim

    def cache_bytes(self, context: int, kv_bytes: int, state_bytes: int) -> int:
        """The state and conv history: constant in the context."""
        return self.state_elements() * state_bytes + self.conv_channels * (self.conv_kernel - 1) * kv_bytes

    def num_blocks(self, context: int, page_tokens: int, speculative_tokens: int = 0) -> int:
        return 2 if speculative_tokens else 1  # the live state, and its snapshot when speculating


MixerShape = AttentionShape | DeltaRuleShape


@dataclass(frozen=True, slots=True)
class CacheMemoryModel:
    """Per-layer mixer shapes, the element sizes the caches are stored in, and the block layout.

    ``kv_bytes``: keys, values and conv history (the model's dtype: 2 for bf16, 4 for fp32).
    ``state_bytes``: recurrent states, kept in fp32 for accuracy.
    ``page_tokens``: tokens per attention page; None derives it (see the module docstring).
    ``block_bytes`` follows: the larger of a page and the largest recurrent slot, 256-byte aligned.
    """

    layers: tuple[dict[Mixer, MixerShape], ...]
    kv_bytes: int = 2
    state_bytes: int = 4
    page_tokens: int | None = None
    block_bytes: int = field(init=False, compare=False)

    def __post_init__(self) -> None:
        shapes = [shape for layer in self.layers for shape in layer.values()]
        token = max((s.token_bytes(self.kv_bytes) for s in shapes if isinstance(s, AttentionShape)), default=0)
        slot = max((s.cache_bytes(0, self.kv_bytes, self.state_bytes) for s in shapes
                    if isinstance(s, DeltaRuleShape)), default=0)
        page = self.page_tokens
        if page is None:  # the shortest aligned page that holds a recurrent slot
            page = PAGE_ALIGN_TOKENS * max(1, _ceil_div(slot, PAGE_ALIGN_TOKENS * token)) if token else PAGE_ALIGN_TOKENS
            object.__setattr__(self, "page_tokens", page)
        elif page < 1:
            raise ValueError(f"page_tokens must be at least 1, got {page}")
        block = _ceil_div(max(page * token, slot, 1), BLOCK_ALIGN_BYTES) * BLOCK_ALIGN_BYTES
        object.__setattr__(self, "block_bytes", block)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def shape(self, layer: int, mixer: Mixer) -> MixerShape:
        try:
            return self.layers[layer][mixer]
        except KeyError:
            raise InvalidPlacement(f"layer {layer} has no {mixer.value} mixer") from None

    def layer_blocks(self, layer: int, mixer: Mixer, context: int, speculative_tokens: int = 0) -> int:
        return self.shape(layer, mixer).num_blocks(context, self.page_tokens, speculative_tokens)

    def layer_bytes(self, layer: int, mixer: Mixer, context: int) -> int:
        """Bytes one layer's cache reserves: whole blocks."""
        return self.layer_blocks(layer, mixer, context) * self.block_bytes

    def sequence_blocks(self, placement: Placement, context: int, speculative_tokens: int = 0) -> int:
        if len(placement) != self.num_layers:
            raise InvalidPlacement(
                f"placement {placement.code} has {len(placement)} layers, the model {self.num_layers}"
            )
        return sum(self.layer_blocks(i, m, context, speculative_tokens) for i, m in enumerate(placement))

    def sequence_bytes(self, placement: Placement, context: int, speculative_tokens: int = 0) -> int:
        """Bytes one sequence of ``context`` tokens reserves under ``placement`` (page rounding included)."""
        return self.sequence_blocks(placement, context, speculative_tokens) * self.block_bytes

    def speculative_bytes(self, target: Placement, draft: Placement | None, context: int, tokens: int) -> int:
        """What a request reserves when ``draft`` proposes ``tokens`` tokens per verify step for ``target``:
        both placements' caches at ``context`` with the slack speculation needs (or the target's alone)."""
        if draft is None or tokens == 0:
            return self.sequence_bytes(target, context)
        return self.sequence_bytes(target, context, tokens) + self.sequence_bytes(draft, context, tokens)

    def usable_blocks(self, budget_bytes: int) -> int:
        """Blocks a pool built on ``budget_bytes`` lends out: all that fit but one (the pool's null block,
        which padded rows read and write)."""
        return max(budget_bytes // self.block_bytes - 1, 0)

    def usable_bytes(self, budget_bytes: int) -> int:
        return self.usable_blocks(budget_bytes) * self.block_bytes

    def max_sequences(self, placement: Placement, context: int, budget_bytes: int) -> int:
        """How many sequences of this placement and context fit in ``budget_bytes`` of reservations."""
        per_sequence = self.sequence_bytes(placement, context)
        return budget_bytes // per_sequence if per_sequence else 0

    def to_dict(self) -> dict:
        def shape_dict(shape: MixerShape) -> dict:
            kind = "attention" if isinstance(shape, AttentionShape) else "delta_rule"
            return {"kind": kind, **{f: getattr(shape, f) for f in shape.__slots__}}

        return {
            "kv_bytes": self.kv_bytes,
            "state_bytes": self.state_bytes,
            "page_tokens": self.page_tokens,
            "layers": [{m.value: shape_dict(s) for m, s in layer.items()} for layer in self.layers],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "CacheMemoryModel":
        def shape(entry: dict) -> MixerShape:
            fields = {k: v for k, v in entry.items() if k != "kind"}
            return AttentionShape(**fields) if entry["kind"] == "attention" else DeltaRuleShape(**fields)

        layers = tuple({Mixer(name): shape(entry) for name, entry in layer.items()} for layer in data["layers"])
        return cls(layers=layers, kv_bytes=data["kv_bytes"], state_bytes=data["state_bytes"],
                   page_tokens=data.get("page_tokens"))
