"""A supernet started from its teacher: attention is the teacher's, GDN and KDA start quiet, the rest is copied."""

from __future__ import annotations

import torch

from policies.placement import Mixer, Placement
from workers.model.batch import ForwardBatch
from workers.model.config import parse_config
from workers.model.supernet import SupernetLM
from workers.model.tiny import init_weights
from workers.training.shapes import TINY_TRAINING_SHAPE, supernet_config, supernet_config_from_teacher, teacher_config
from workers.training.surgery import init_from_teacher


def models(window: int = 8):
    raw = teacher_config(supernet_config(TINY_TRAINING_SHAPE, 300, 1, 2))
    teacher = SupernetLM(parse_config(raw))
    init_weights(teacher, torch.Generator().manual_seed(0), std=0.1)
    supernet = SupernetLM(parse_config(supernet_config_from_teacher(raw, window)))
    init_from_teacher(supernet, teacher, torch.Generator().manual_seed(1))
    return teacher, supernet


def logits(model, tokens, placement):
    return model(ForwardBatch.dense(tokens, [placement] * len(tokens)), all_logits=True)


def test_all_attention_placement_is_the_teacher():
    teacher, supernet = models()
    tokens = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(2))
    layers = supernet.config.num_layers
    expected = logits(teacher, tokens, teacher.config.main_placement)
    torch.testing.assert_close(logits(supernet, tokens, Placement((Mixer.ATTENTION,) * layers)), expected, rtol=0, atol=0)
    # within the window, sliding-window attention is full attention
    torch.testing.assert_close(logits(supernet, tokens[:, :8], Placement((Mixer.SLIDING_WINDOW,) * layers)),
                               logits(teacher, tokens[:, :8], teacher.config.main_placement), rtol=1e-5, atol=1e-5)


def test_linear_mixers_start_with_closed_output_gates():
    """GDN's z gate starts at zero and KDA's output gate near zero: each adds (almost) nothing to the residual."""
    _, supernet = models()
    x = torch.randn(1, 12, supernet.config.hidden_size)
    batch = ForwardBatch.dense(torch.zeros(1, 12, dtype=torch.long), [supernet.config.main_placement])
    block = supernet.blocks[0]
    group = batch.groups(0)[Mixer.ATTENTION]
    assert block.by_kind[Mixer.GDN](x[0], group).abs().max() == 0
    assert block.by_kind[Mixer.KDA](x[0], group).abs().max() < 0.05 * block.by_kind[Mixer.ATTENTION](x[0], group).abs().max()


def test_shared_weights_are_copied():
    teacher, supernet = models()
    state = supernet.state_dict()
    for name, tensor in teacher.state_dict().items():
        if ".mixer." not in name:
            assert torch.equal(state[name], tensor), name
