"""Our mixers against independent references: fla's naive.py for the delta rules (the oracle the
style guide names), and direct transcriptions of the reference's formulas (shared/design/SUPERNET.md)
for whole mixers, built from the module's own weights with F.conv1d and explicit softmax."""

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from policies.placement import Mixer, Placement
from workers.model.batch import ForwardBatch
from workers.model.recurrent import recurrent_delta_rule


def _load_naive(relative: str):
    """fla's naive reference functions, loaded by file path: fla's package __init__ needs triton."""
    spec = importlib.util.find_spec("fla")
    if spec is None:
        pytest.skip("flash-linear-attention is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    module_spec = importlib.util.spec_from_file_location(f"fla_naive_{path.parent.name}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def l2(x):
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)


@pytest.mark.parametrize("per_channel", [False, True], ids=["gdn", "kda"])
def test_delta_rule_matches_fla_naive(per_channel):
    generator = torch.Generator().manual_seed(0)
    N, T, H, K, V = 2, 37, 3, 8, 6

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    q, k, v = l2(randn(N, T, H, K)), l2(randn(N, T, H, K)), randn(N, T, H, V)
    g = -F.softplus(randn(N, T, H, K) if per_channel else randn(N, T, H))
    beta = torch.sigmoid(randn(N, T, H))
    state = randn(N, H, K, V)
    ours, ours_state = recurrent_delta_rule(q, k, v, g, beta, state, K**-0.5)
    if per_channel:
        naive = _load_naive("ops/kda/naive.py")
        ref, ref_state = naive.naive_recurrent_kda(q, k, v, g, beta, scale=K**-0.5, initial_state=state,
                                                   output_final_state=True)
    else:
        naive = _load_naive("ops/gated_delta_rule/naive.py")
        ref, ref_state = naive.naive_recurrent_gated_delta_rule(q, k, v, beta, g, scale=K**-0.5,
                                                                initial_state=state, output_final_state=True)
    torch.testing.assert_close(ours.float(), ref.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_state.float(), ref_state.float(), rtol=1e-5, atol=1e-5)


# --- whole mixers, transcribed from the reference's formulas ------------------------------------------


def causal_conv_reference(x, weight):
    """x [T, C]; weight [C, 1, K]: depthwise, zero history, last tap on the current token."""
    K = weight.shape[-1]
    return F.conv1d(F.pad(x.t()[None], (K - 1, 0)), weight, groups=x.shape[1])[0].t()


def gated_norm_reference(o, gate, weight, eps, act=F.silu):
    o, gate = o.float(), gate.float()
    return o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + eps) * weight * act(gate)


def delta_rule_loop(q, k, v, g, beta):
    """Per token, per head, exactly as written: S = exp(g) S; u = beta (v - S^T k); S += k u^T; o = S^T q."""
    T, H, dk = q.shape
    S = torch.zeros(H, dk, v.shape[-1], dtype=torch.float64)
    out = torch.zeros(T, H, v.shape[-1], dtype=torch.float64)
    q, k = l2(q.double()) * dk**-0.5, l2(k.double())
    for t in range(T):
        for h in range(H):
            decay = g[t, h].double().exp()
            S[h] = (decay[:, None] if decay.dim() else decay) * S[h]
            u = beta[t, h].double() * (v[t, h].double() - S[h].t() @ k[t, h])
            S[h] = S[h] + torch.outer(k[t, h], u)
            out[t, h] = S[h].t() @ q[t, h]
    return out


def gdn_reference(m, x):
    T = x.shape[0]
    qkvz = m.in_proj_qkvz(x)
    kd, vd = m.key_dim, m.value_dim
    q, k, v, z = qkvz[:, :kd], qkvz[:, kd:2 * kd], qkvz[:, 2 * kd:2 * kd + vd], qkvz[:, 2 * kd + vd:]
    ba = m.in_proj_ba(x)
    b, a = ba[:, :m.value_heads], ba[:, m.value_heads:]
    conv = F.silu(causal_conv_reference(torch.cat([q, k, v], -1), m.convolution.weight))
    q, k, v = conv[:, :kd], conv[:, kd:2 * kd], conv[:, 2 * kd:]
    rep = m.value_heads // m.key_heads
    q = q.reshape(T, m.key_heads, -1).repeat_interleave(rep, 1)
    k = k.reshape(T, m.key_heads, -1).repeat_interleave(rep, 1)
    v = v.reshape(T, m.value_heads, -1)
    g = -torch.exp(m.A_log.float()) * F.softplus(a.float() + m.dt_bias.float())
    o = delta_rule_loop(q, k, v, g, torch.sigmoid(b))
    o = gated_norm_reference(o, z.reshape(T, m.value_heads, -1), m.norm.weight, m.norm.eps)
    return m.out_proj(o.float().reshape(T, -1))


def kda_reference(m, x):
    T, H, D = x.shape[0], m.heads, m.head_dim
    q = F.silu(causal_conv_reference(m.q_proj(x), m.q_conv.weight)).reshape(T, H, D)
    k = F.silu(causal_conv_reference(m.k_proj(x), m.k_conv.weight)).reshape(T, H, D)
    v = F.silu(causal_conv_reference(m.v_proj(x), m.v_conv.weight)).reshape(T, H, D)
    f = m.f_b_proj(m.f_a_proj(x)).reshape(T, H, D)
    g = -torch.exp(m.A_log.float())[None, :, None] * F.softplus(f.float() + m.dt_bias.float().reshape(H, D))
    beta = torch.sigmoid(m.beta_proj(x).float())
    o = delta_rule_loop(q, k, v, g, beta)
    o = gated_norm_reference(o, m.g_b_proj(m.g_a_proj(x)).reshape(T, H, D), m.norm.weight, m.norm.eps)
    return m.o_proj(o.float().reshape(T, -1))


def attention_reference(m, x):
    T, H, KVH, d = x.shape[0], m.heads, m.kv_heads, m.head_size
    q, k, v = m.q_proj(x).reshape(T, H, d), m.k_proj(x).reshape(T, KVH, d), m.v_proj(x).reshape(T, KVH, d)
    inv_freq = 1.0 / (m.config.rotary_theta ** (torch.arange(0, d, 2).float() / d))
    angles = torch.arange(T).float()[:, None] * inv_freq[None]
    cos, sin = torch.cat([angles, angles], -1).cos()[:, None], torch.cat([angles, angles], -1).sin()[:, None]

    def rotate(t):
        return t * cos + torch.cat([-t[..., d // 2:], t[..., :d // 2]], -1) * sin

    q, k = rotate(q), rotate(k)
    out = torch.zeros(T, H, d)
    for h in range(H):
        kv = h // (H // KVH)
        scores = (q[:, h] @ k[:, kv].t()) * d**-0.5
        p, j = torch.arange(T)[:, None], torch.arange(T)[None]
        visible = (j <= p) & ((j > p - m.window) if m.window else True)
        out[:, h] = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1) @ v[:, kv]
    return m.o_proj(out.reshape(T, -1))


REFERENCES = {Mixer.ATTENTION: attention_reference, Mixer.SLIDING_WINDOW: attention_reference,
              Mixer.GDN: gdn_reference, Mixer.KDA: kda_reference}


@pytest.mark.parametrize("mixer", list(Mixer), ids=lambda m: m.value)
@torch.no_grad()
def test_mixer_matches_the_reference_formulas(tiny_model, mixer):
    module = tiny_model.blocks[2].by_kind[mixer]
    x = torch.randn(40, tiny_model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    placement = Placement.uniform(mixer, tiny_model.config.num_layers)
    group = ForwardBatch.build([[0] * 40], [placement]).groups(2)[mixer]
    torch.testing.assert_close(module(x, group), REFERENCES[mixer](module, x), rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_model_matches_a_block_by_block_reference(tiny_model):
    """Block: x + mixer(rmsnorm(x)), then + mlp(rmsnorm(.)); final rmsnorm; lm_head. No scaling anywhere."""
    tokens = torch.randint(4, 2048, (30,), generator=torch.Generator().manual_seed(2))
    placement = tiny_model.config.placement("GKSAGS")

    def rms(x, weight, eps):
        return weight * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps))

    eps = tiny_model.config.norm_eps
    h = tiny_model.model.embed_tokens.weight[tokens]
    for block, mixer in zip(tiny_model.blocks, placement):
        h = h + REFERENCES[mixer](block.by_kind[mixer], rms(h, block.input_layernorm.weight, eps))
        x = rms(h, block.post_attention_layernorm.weight, eps)
        h = h + block.mlp.down_proj(F.silu(block.mlp.gate_proj(x)) * block.mlp.up_proj(x))
    expected = rms(h, tiny_model.model.norm.weight, eps) @ tiny_model.lm_head.weight.t()
    got = tiny_model(ForwardBatch.build([tokens.tolist()], [placement]), all_logits=True)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
