"""fla's CUDA kernels against the plain-torch reference, prefill and decode, for GDN and KDA.

Run on the GPU machine: `python -m pytest -q tests/gpu -s` (skipped without CUDA).
"""

import pytest
import torch

from policies.placement import Mixer
from workers.model.batch import ForwardBatch, Row, RowGroup
from workers.model.cache import DeltaRuleCache
from workers.model.recurrent import delta_rule

pytestmark = pytest.mark.gpu


def _group(lengths, caches):
    rows, offset = [], 0
    for n in lengths:
        rows.append(Row(offset, n, 5))
        offset += n
    return RowGroup(rows, caches, torch.arange(offset), None)


def _inputs(T, H, dk, dv, per_channel, dtype, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device)

    q, k, v = randn(T, H, dk).to(dtype), randn(T, H, dk).to(dtype), randn(T, H, dv).to(dtype)
    gate = -torch.nn.functional.softplus(randn(T, H, dk) if per_channel else randn(T, H)) * 0.5
    beta = torch.sigmoid(randn(T, H)).to(dtype)
    return q, k, v, gate.float(), beta


@pytest.mark.parametrize("per_channel", [False, True], ids=["gdn", "kda"])
@pytest.mark.parametrize("lengths", [[1, 1, 1, 1], [37, 1, 100, 5]], ids=["decode", "prefill"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fla_delta_rule_matches_torch(per_channel, lengths, dtype):
    from workers.model.kernels import FlaKernels

    H, dk, dv = 4, 64, 64
    q, k, v, g, beta = _inputs(sum(lengths), H, dk, dv, per_channel, dtype, "cuda", seed=len(lengths))

    def caches():
        out = []
        for i in range(len(lengths)):
            cache = DeltaRuleCache(H, dk, dv, [8], 4, dtype, "cuda")
            cache.state.copy_(torch.randn(H, dk, dv, generator=torch.Generator().manual_seed(i)).cuda() * 0.1)
            out.append(cache)
        return out

    ref_caches, fla_caches = caches(), caches()
    expected = delta_rule(q, k, v, g, beta, _group(lengths, ref_caches), kernels=None)
    got = delta_rule(q, k, v, g, beta, _group(lengths, fla_caches), kernels=FlaKernels())
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(got, expected, **tol)
    for a, b in zip(fla_caches, ref_caches):
        torch.testing.assert_close(a.state, b.state, **tol)
    print(f"{'kda' if per_channel else 'gdn'} {lengths} {dtype}: max |out diff| "
          f"{(got - expected).abs().max().item():.2e}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_model_on_cuda_with_fla_matches_cpu_reference(tiny_checkpoint, dtype):
    from workers.model.loader import load_checkpoint

    cpu = load_checkpoint(tiny_checkpoint, kernels="torch")
    gpu = load_checkpoint(tiny_checkpoint, device="cuda", dtype=dtype, kernels="fla")
    assert gpu.blocks[0].by_kind[Mixer.GDN].kernels is not None
    prompts = [[1] + list(range(40, 80)), [1, 5, 6, 7]]
    for code in ["GGGGGG", "KKKKKK", "ASGKAS"]:
        placements = [cpu.config.placement(code)] * 2
        ref_caches = [cpu.new_cache(p, 64) for p in placements]
        gpu_caches = [gpu.new_cache(p, 64) for p in placements]
        ref = cpu(ForwardBatch.build(prompts, placements, ref_caches))
        out = gpu(ForwardBatch.build(prompts, placements, gpu_caches, device="cuda"))
        ref_step = cpu(ForwardBatch.build([[9], [10]], placements, ref_caches))
        out_step = gpu(ForwardBatch.build([[9], [10]], placements, gpu_caches, device="cuda"))
        tol = dict(rtol=5e-2, atol=5e-2) if dtype == torch.bfloat16 else dict(rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(out.float().cpu(), ref, **tol)
        torch.testing.assert_close(out_step.float().cpu(), ref_step, **tol)
        print(f"model {code} {dtype}: prefill max diff {(out.float().cpu() - ref).abs().max().item():.2e}, "
              f"decode {(out_step.float().cpu() - ref_step).abs().max().item():.2e}")
