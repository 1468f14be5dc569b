"""An analytic speed table: each step costs the bytes it must read over the memory bandwidth (or its flops).

Not a measurement. It stands in where no profiled table exists yet (the 15B
H100 table needs the GPU machine: ``supernet-router profile --shape
superapriel-15b --device cuda``) and its fingerprint says so
(``cache_fill: "roofline model, not measured"``). The routing simulator and
tests use it; the decode floor in the engine benchmark is the same arithmetic.

Per layer and step, for a group of B rows at context c (bf16 weights and KV, fp32 states):
    attention       weights + B * c * kv_bytes_per_token        (sliding window: min(c, window))
    gdn / kda       weights + B * 2 * state_bytes               (read and write the recurrent state)
    shared (MLP)    weights, or 2 * params * B flops if more
"""

from __future__ import annotations

from policies.memory import AttentionShape, CacheMemoryModel, DeltaRuleShape
from policies.placement import MIXERS, Mixer

H100 = {"name": "NVIDIA H100 80GB HBM3", "bandwidth": 3.0e12, "flops": 7.0e14}  # achievable, not peak
SUPER_APRIEL_15B = {
    "hidden": 5120, "ffn": 14336, "vocab": 131072, "layers": 48,
    "heads": 32, "kv_heads": 8, "head_size": 128, "window": 4096,
    "gdn_key_heads": 8, "gdn_value_heads": 32, "gdn_dim": 128, "kda_heads": 32, "kda_dim": 128,
}


def super_apriel_memory(num_layers: int = 48, shape: dict = SUPER_APRIEL_15B) -> CacheMemoryModel:
    """Cache shapes of ``num_layers`` Super Apriel 15B layers (bf16 KV, fp32 recurrent states)."""
    attention = AttentionShape(shape["kv_heads"], shape["head_size"])
    gdn_conv = 2 * shape["gdn_key_heads"] * shape["gdn_dim"] + shape["gdn_value_heads"] * shape["gdn_dim"]
    layer = {
        Mixer.ATTENTION: attention,
        Mixer.SLIDING_WINDOW: AttentionShape(shape["kv_heads"], shape["head_size"], shape["window"]),
        Mixer.GDN: DeltaRuleShape(shape["gdn_value_heads"], shape["gdn_dim"], shape["gdn_dim"], gdn_conv, 4),
        Mixer.KDA: DeltaRuleShape(shape["kda_heads"], shape["kda_dim"], shape["kda_dim"],
                                  3 * shape["kda_heads"] * shape["kda_dim"], 4),
    }
    return CacheMemoryModel((layer,) * num_layers, 2, 4)


def mixer_params(shape: dict) -> dict[Mixer, float]:
    h, d = shape["hidden"], shape["head_size"]
    attention = h * shape["heads"] * d * 2 + h * shape["kv_heads"] * d * 2
    gdn_key, gdn_value = shape["gdn_key_heads"] * shape["gdn_dim"], shape["gdn_value_heads"] * shape["gdn_dim"]
    gdn = h * (2 * gdn_key + 2 * gdn_value) + h * 2 * shape["gdn_value_heads"] + gdn_value * h
    kda_size = shape["kda_heads"] * shape["kda_dim"]
    kda = 4 * h * kda_size + 2 * (h * shape["kda_dim"] + shape["kda_dim"] * kda_size) + h * shape["kda_heads"]
    return {Mixer.ATTENTION: attention, Mixer.SLIDING_WINDOW: attention, Mixer.GDN: gdn, Mixer.KDA: kda}


def roofline_speed_dict(memory: CacheMemoryModel, shape: dict = SUPER_APRIEL_15B, device: dict = H100,
                        batches=(1, 2, 4, 8, 16, 32, 64, 128, 256), contexts=(1024, 4096, 8192, 16384, 32768, 65536),
                        prefill_contexts=(0, 4096, 16384, 32768, 65536), tokens=(1, 16, 64, 256, 1024, 4096),
                        prefill_chunk: int = 2048, weight_bytes: int = 2) -> dict:
    """A ``supernet-router/speed`` table computed from bytes and flops; see the module docstring."""
    bandwidth, flops = device["bandwidth"], device["flops"]
    params = mixer_params(shape)
    layer = memory.layers[0]

    def ms(bytes_read: float, ops: float = 0.0) -> float:
        return 1000 * max(bytes_read / bandwidth, ops / flops)

    def decode(mixer: Mixer, batch: int, context: int) -> float:
        weights = params[mixer] * weight_bytes
        cache = layer[mixer]
        if isinstance(cache, AttentionShape):
            kv = batch * cache.cache_bytes(context, memory.kv_bytes, memory.state_bytes)
            return ms(weights + kv, 2 * params[mixer] * batch)
        state = cache.cache_bytes(0, memory.kv_bytes, memory.state_bytes)
        return ms(weights + 2 * batch * state, 2 * params[mixer] * batch)

    def prefill_per_token(mixer: Mixer, context: int) -> float:
        chunk = prefill_chunk
        ops = 2 * params[mixer] * chunk
        cache = layer[mixer]
        if isinstance(cache, AttentionShape):
            seen = context if cache.window is None else min(context, cache.window)
            ops += 4 * shape["heads"] * shape["head_size"] * chunk * (seen + chunk / 2)
        return ms(params[mixer] * weight_bytes, ops) / chunk

    mlp = 3 * shape["hidden"] * shape["ffn"]
    head = shape["hidden"] * shape["vocab"]
    return {
        "format": "supernet-router/speed", "version": 1,
        "fingerprint": {"device": f"{device['name']} (roofline model, not measured)", "model": "shape:superapriel-15b",
                        "model_sha256": "0" * 64, "num_layers": memory.num_layers, "dtype": "bfloat16",
                        "created": "2026-11-23T00:00:00+00:00", "software": "policies.roofline"},
        "batches": list(batches), "contexts": list(contexts),
        "decode_ms": {m.value: [[decode(m, b, c) for c in contexts] for b in batches] for m in MIXERS},
        "prefill_chunk": prefill_chunk, "prefill_contexts": list(prefill_contexts),
        "prefill_ms_per_token": {m.value: [prefill_per_token(m, c) for c in prefill_contexts] for m in MIXERS},
        "tokens": list(tokens),
        "shared_ms": [ms(mlp * weight_bytes, 2 * mlp * t) for t in tokens],
        "head_ms": [ms(head * weight_bytes, 2 * head * t) for t in tokens],
        "memory": memory.to_dict(),
        "measurement": {"warmup": 0, "repeats": 1, "cache_fill": "roofline model, not measured", "monotone": True},
    }
