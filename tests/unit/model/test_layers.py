"""``project``: several linears of one input as one matmul, without holding any weight twice."""
import torch
from safetensors.torch import load_file
from torch import nn

from workers.model.batch import ForwardBatch
from workers.model.layers import project
from workers.model.loader import save_checkpoint


def separate(x, *linears):
    return torch.cat([linear(x) for linear in linears], dim=-1)


def linears():
    torch.manual_seed(0)
    return nn.Linear(8, 5), nn.Linear(8, 3, bias=False), nn.Linear(8, 2)


@torch.no_grad()
def test_fused_projection_equals_the_separate_linears_and_shares_their_bytes():
    a, b, c = linears()
    x = torch.randn(4, 8)
    torch.testing.assert_close(project(x, a, b, c), separate(x, a, b, c), rtol=0, atol=1e-6)
    storage = a.weight.untyped_storage().data_ptr()
    assert b.weight.untyped_storage().data_ptr() == c.weight.untyped_storage().data_ptr() == storage
    assert b.bias is None


@torch.no_grad()
def test_weights_loaded_or_replaced_after_fusing_are_used():
    a, b, c = linears()
    x = torch.randn(4, 8)
    project(x, a, b, c)
    b.load_state_dict({"weight": torch.randn(3, 8)})  # copies in place: into the fused weight
    torch.testing.assert_close(project(x, a, b, c), separate(x, a, b, c), rtol=0, atol=1e-6)
    c.weight.data = torch.randn(2, 8)  # a new tensor: the stale fused weight must not be used
    torch.testing.assert_close(project(x, a, b, c), separate(x, a, b, c), rtol=0, atol=1e-6)


def test_under_autograd_each_linear_gets_its_gradient():
    a, b, c = linears()
    project(torch.randn(4, 8), a, b, c).square().sum().backward()
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in (a, b, c))


def test_a_model_that_has_run_saves_a_checkpoint_with_every_tensor(tiny_checkpoint, tmp_path):
    from workers.model.loader import load_checkpoint

    model = load_checkpoint(tiny_checkpoint, kernels="torch")
    with torch.no_grad():
        model(ForwardBatch.build([[1, 2, 3]], [model.config.placement("AGKSAG")]))
    save_checkpoint(model, tmp_path / "copy")  # fused weights share storage, rows apart
    assert set(load_file(tmp_path / "copy" / "model.safetensors")) == set(model.state_dict())


def test_fusing_under_inference_mode_leaves_weights_trainable():
    a, b, c = linears()
    with torch.inference_mode():
        project(torch.randn(4, 8), a, b, c)
    project(torch.randn(4, 8), a, b, c).sum().backward()
    assert all(not m.weight.is_inference() and m.weight.grad is not None for m in (a, b, c))
