"""Parse an Apriel2 ``config.json`` into typed per-layer mixer configs.

Key names are the checkpoint's (see shared/design/SUPERNET.md). Anything this
code cannot run is refused with a ``CheckpointError`` that names the key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from policies.errors import CheckpointError, InvalidPlacement
from policies.memory import AttentionShape, CacheMemoryModel, DeltaRuleShape
from policies.placement import Mixer, Placement


@dataclass(frozen=True, slots=True)
class AttentionConfig:
    heads: int
    head_groups: int
    head_size: int
    window_size: int | None
    rotary_theta: float
    q_bias: bool = False
    k_bias: bool = False
    v_bias: bool = False
    o_bias: bool = False


@dataclass(frozen=True, slots=True)
class GdnConfig:
    value_heads: int
    key_heads: int
    key_head_dim: int
    value_head_dim: int
    conv_kernel: int
    conv_activation: str = "silu"
    norm_eps: float = 1e-5


@dataclass(frozen=True, slots=True)
class KdaConfig:
    heads: int
    head_dim: int
    conv_kernel: int
    norm_eps: float = 1e-5
    norm_activation: str = "silu"


MixerConfig = AttentionConfig | GdnConfig | KdaConfig


@dataclass(frozen=True, slots=True)
class MlpConfig:
    intermediate_size: int
    activation: str = "silu"


@dataclass(frozen=True, slots=True)
class LayerConfig:
    """One decoder block: the mixers it holds (by kind) and where their tensors live."""

    mixers: dict[Mixer, MixerConfig]
    tensor_names: dict[Mixer, str]  # mixer -> module path inside the block ("mixer.mixers.gdn" or "mixer")
    main_mixer: Mixer
    mlp: MlpConfig


@dataclass(frozen=True, slots=True)
class SupernetConfig:
    hidden_size: int
    vocab_size: int
    layers: tuple[LayerConfig, ...]
    norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def main_placement(self) -> Placement:
        """What the reference runs in eval mode: each block's ``main_mixer_name``."""
        return Placement(tuple(layer.main_mixer for layer in self.layers))

    def placement(self, spec) -> Placement:
        """Parse and check a placement against the mixers each layer really holds."""
        placement = Placement.parse(spec, self.num_layers)
        for i, (mixer, layer) in enumerate(zip(placement, self.layers)):
            if mixer not in layer.mixers:
                have = ", ".join(m.value for m in layer.mixers)
                raise InvalidPlacement(f"layer {i} has no {mixer.value} mixer (it holds: {have})")
        return placement

    def memory_model(self, kv_bytes: int = 2, page_tokens: int | None = None) -> CacheMemoryModel:
        """The cache layout of this model: ``kv_bytes`` per key/value/conv element, fp32 states; pages of
        ``page_tokens`` tokens (None: the derived default, which the router's tables assume)."""
        return CacheMemoryModel(
            layers=tuple({m: cache_shape(c) for m, c in layer.mixers.items()} for layer in self.layers),
            kv_bytes=kv_bytes,
            state_bytes=4,
            page_tokens=page_tokens,
        )


def cache_shape(config: MixerConfig):
    """What one sequence's cache of this mixer holds (``policies.memory``): the pool is laid out from it."""
    if isinstance(config, AttentionConfig):
        return AttentionShape(config.head_groups, config.head_size, config.window_size)
    if isinstance(config, GdnConfig):
        key_dim = config.key_heads * config.key_head_dim
        conv_channels = 2 * key_dim + config.value_heads * config.value_head_dim
        return DeltaRuleShape(
            config.value_heads, config.key_head_dim, config.value_head_dim, conv_channels, config.conv_kernel
        )
    return DeltaRuleShape(config.heads, config.head_dim, config.head_dim, 3 * config.heads * config.head_dim, config.conv_kernel)


def load_config(path: str | Path) -> SupernetConfig:
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    try:
        raw = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file}: no config.json (is this a Hugging Face checkpoint folder?)") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file}: not valid JSON ({exc})") from None
    return parse_config(raw, source=str(file))


def parse_config(raw: dict, source: str = "config.json") -> SupernetConfig:
    reader = _Reader(raw, source)
    decoder = reader.get(raw, "decoder", dict, "decoder")
    num_blocks = reader.get(decoder, "num_blocks", int, "decoder.num_blocks")
    kind = decoder.get("type", "fixed")
    norm_eps = float(reader.get(reader.get(reader.get(raw, "head", dict, "head"), "normalization", dict, "head.normalization"),
                                "epsilon", (int, float), "head.normalization.epsilon"))
    layers = []
    for i in range(num_blocks):
        if kind == "fixed":
            block, key = reader.get(decoder, "block", dict, "decoder.block"), "decoder.block"
        elif kind == "pattern":
            pattern = reader.get(decoder, "pattern", list, "decoder.pattern")
            if not pattern:
                raise CheckpointError(f"{source}: decoder.pattern is empty")
            name = pattern[i % len(pattern)]
            block = reader.get(reader.get(decoder, "blocks", dict, "decoder.blocks"), name, dict, f"decoder.blocks.{name}")
            key = f"decoder.blocks.{name}"
        else:
            raise CheckpointError(f"{source}: decoder.type {kind!r} is unknown (expected 'fixed' or 'pattern')")
        layers.append(reader.layer(block, key))
    embeddings = raw.get("embeddings", {})
    return SupernetConfig(
        hidden_size=reader.get(raw, "hidden_size", int, "hidden_size"),
        vocab_size=reader.get(raw, "vocab_size", int, "vocab_size"),
        layers=tuple(layers),
        norm_eps=norm_eps,
        max_position_embeddings=int(embeddings.get("max_position_embeddings", raw.get("max_position_embeddings", 4096))),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        bos_token_id=raw.get("bos_token_id", 1),
        eos_token_id=raw.get("eos_token_id", 2),
        pad_token_id=raw.get("pad_token_id"),
        raw=raw,
    )


class _Reader:
    """Typed lookups whose errors name the file and the dotted key."""

    def __init__(self, raw: dict, source: str):
        self.raw, self.source = raw, source

    def get(self, node: dict, name: str, kind, key: str, default=...):
        if name not in node:
            if default is not ...:
                return default
            raise CheckpointError(f"{self.source}: missing key {key}")
        value = node[name]
        if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
            raise CheckpointError(f"{self.source}: {key} must be {_kind_name(kind)}, got {value!r}")
        return value

    def layer(self, block: dict, key: str) -> LayerConfig:
        mixer = self.get(block, "mixer", dict, f"{key}.mixer")
        mixers: dict[Mixer, MixerConfig] = {}
        names: dict[Mixer, str] = {}
        if mixer.get("type") == "stochastic":
            subs = self.get(mixer, "mixers", dict, f"{key}.mixer.mixers")
            for name, sub in subs.items():
                sub_key = f"{key}.mixer.mixers.{name}"
                try:
                    kind = Mixer(name)
                except ValueError:
                    raise CheckpointError(
                        f"{self.source}: {sub_key}: unknown mixer name {name!r} "
                        f"(expected attention, sliding_window, gdn or kda)"
                    ) from None
                config = self.mixer(sub, sub_key)
                if _kind_of(config) is not kind:
                    raise CheckpointError(f"{self.source}: {sub_key} is named {name} but configured as {_kind_of(config).value}")
                mixers[kind], names[kind] = config, f"mixer.mixers.{name}"
            main_name = mixer.get("main_mixer_name", next(iter(subs)))
            if main_name not in subs:
                raise CheckpointError(f"{self.source}: {key}.mixer.main_mixer_name {main_name!r} is not one of its mixers")
            main = Mixer(main_name)
        else:
            config = self.mixer(mixer, f"{key}.mixer")
            main = _kind_of(config)
            mixers[main], names[main] = config, "mixer"
        mlp = self.get(block, "mlp", dict, f"{key}.mlp")
        if not mlp.get("gated", False):
            raise CheckpointError(f"{self.source}: {key}.mlp.gated must be true (only gated MLPs are supported)")
        return LayerConfig(
            mixers=mixers,
            tensor_names=names,
            main_mixer=main,
            mlp=MlpConfig(self.get(mlp, "intermediate_size", int, f"{key}.mlp.intermediate_size"), mlp.get("activation", "silu")),
        )

    def mixer(self, node: dict, key: str) -> MixerConfig:
        kind = node.get("type", "attention")
        if kind == "attention":
            heads = self.get(node, "heads", int, f"{key}.heads")
            rotary = self.get(node, "rotary", dict, f"{key}.rotary")
            if rotary.get("type") != "mistral_1d":
                raise CheckpointError(f"{self.source}: {key}.rotary.type {rotary.get('type')!r} is not supported (expected mistral_1d)")
            default_bias = bool(node.get("add_linear_biases", False))

            def bias(layer: str) -> bool:
                enabled = node.get(layer, {}).get("bias", {}).get("enabled")
                return default_bias if enabled is None else bool(enabled)

            window = node.get("window_size")
            if window is not None and (not isinstance(window, int) or window < 1):
                raise CheckpointError(f"{self.source}: {key}.window_size must be a positive integer or null, got {window!r}")
            return AttentionConfig(
                heads=heads,
                head_groups=self.get(node, "head_groups", int, f"{key}.head_groups", heads),
                head_size=self.get(node, "head_size", int, f"{key}.head_size"),
                window_size=window,
                rotary_theta=float(self.get(rotary, "theta", (int, float), f"{key}.rotary.theta")),
                q_bias=bias("query_layer"), k_bias=bias("key_layer"), v_bias=bias("value_layer"), o_bias=bias("dense_layer"),
            )
        if kind == "gdn":
            conv = self.get(node, "convolution_layer", dict, f"{key}.convolution_layer")
            return GdnConfig(
                value_heads=self.get(node, "value_heads", int, f"{key}.value_heads"),
                key_heads=self.get(node, "key_heads", int, f"{key}.key_heads"),
                key_head_dim=self.get(node, "key_head_dim", int, f"{key}.key_head_dim"),
                value_head_dim=self.get(node, "value_head_dim", int, f"{key}.value_head_dim"),
                conv_kernel=self.get(conv, "kernel_size", int, f"{key}.convolution_layer.kernel_size"),
                conv_activation=conv.get("activation", "silu"),
                norm_eps=float(node.get("norm_eps", 1e-5)),
            )
        if kind == "kda":
            conv = node.get("convolution_layer", {})
            norm = node.get("normalization", {})
            return KdaConfig(
                heads=self.get(node, "heads", int, f"{key}.heads"),
                head_dim=self.get(node, "head_dim", int, f"{key}.head_dim"),
                conv_kernel=int(conv.get("kernel_size", 4)),
                norm_eps=float(norm.get("epsilon", 1e-5)),
                norm_activation=norm.get("activation", "silu"),
            )
        raise CheckpointError(
            f"{self.source}: {key}.type {kind!r} is not a mixer this server runs (expected attention, gdn or kda)"
        )


def _kind_of(config: MixerConfig) -> Mixer:
    if isinstance(config, AttentionConfig):
        return Mixer.ATTENTION if config.window_size is None else Mixer.SLIDING_WINDOW
    return Mixer.GDN if isinstance(config, GdnConfig) else Mixer.KDA


def _kind_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({int: "an integer", float: "a number", dict: "an object", list: "a list", str: "a string"}[k] for k in kinds)


def stochastic_mixer_dict(attention: dict, window_size: int, gdn_key_heads: int, gdn_value_heads: int,
                          gdn_key_head_dim: int, gdn_value_head_dim: int, kda_heads: int, kda_head_dim: int,
                          conv_kernel: int = 4, norm_eps: float = 1e-5) -> dict:
    """A block's four-mixer ``stochastic`` mixer around an ``attention`` config, attention the main mixer."""
    return {
        "type": "stochastic",
        "main_mixer_name": "attention",
        "sampling_strategy": "uniform",
        "mixers": {
            "attention": attention,
            "sliding_window": {**attention, "window_size": window_size},
            "gdn": {
                "type": "gdn", "key_heads": gdn_key_heads, "value_heads": gdn_value_heads,
                "key_head_dim": gdn_key_head_dim, "value_head_dim": gdn_value_head_dim,
                "convolution_layer": {"kernel_size": conv_kernel},
            },
            "kda": {
                "type": "kda", "heads": kda_heads, "head_dim": kda_head_dim,
                "convolution_layer": {"kernel_size": conv_kernel},
                "normalization": {"epsilon": norm_eps},
            },
        },
    }


def supernet_config_dict(
    *,
    hidden_size: int,
    vocab_size: int,
    num_layers: int,
    intermediate_size: int,
    heads: int,
    head_groups: int,
    head_size: int,
    window_size: int,
    gdn_value_heads: int,
    gdn_key_heads: int,
    gdn_key_head_dim: int,
    gdn_value_head_dim: int,
    kda_heads: int,
    kda_head_dim: int,
    conv_kernel: int = 4,
    rotary_theta: float = 1e9,
    max_position_embeddings: int = 4096,
    tie_word_embeddings: bool = False,
    norm_eps: float = 1e-5,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
    pad_token_id: int | None = None,
) -> dict:
    """A ``config.json`` for a four-mixer supernet, in the Apriel2 layout of the released checkpoints."""
    attention = {
        "type": "attention", "heads": heads, "head_groups": head_groups, "head_size": head_size,
        "add_linear_biases": False, "rotary": {"type": "mistral_1d", "theta": rotary_theta}, "window_size": None,
    }
    return {
        "architectures": ["Apriel2ForCausalLM"],
        "model_type": "apriel2_text",
        "hidden_size": hidden_size,
        "vocab_size": vocab_size,
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "embeddings": {"max_position_embeddings": max_position_embeddings},
        "head": {"normalization": {"type": "rms_norm", "epsilon": norm_eps}},
        "decoder": {
            "type": "fixed",
            "num_blocks": num_layers,
            "block": {
                "mixer": stochastic_mixer_dict(attention, window_size, gdn_key_heads, gdn_value_heads, gdn_key_head_dim,
                                               gdn_value_head_dim, kda_heads, kda_head_dim, conv_kernel, norm_eps),
                "mlp": {"type": "mlp", "intermediate_size": intermediate_size, "activation": "silu", "gated": True,
                        "add_linear_biases": False},
                "normalization": {"type": "rms_norm", "epsilon": norm_eps},
            },
        },
    }
