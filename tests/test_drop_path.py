"""The drop path train.compile swaps in (models/drop_path.py): timm's law of stochastic depth, and
blocks of different rates sharing one compiled graph that gives the eager numbers."""
from __future__ import annotations

import copy
import math

import torch
from timm.layers import DropPath
from timm.models.vision_transformer import Block

from mokd_scale.models.drop_path import TensorRateDropPath, tensor_rate_drop_paths


def test_each_sample_is_dropped_or_scaled_as_timm_scales_it():
    x = torch.randn(4000, 3, 2)
    ours, timms = TensorRateDropPath(0.3), DropPath(0.3)
    torch.manual_seed(0)
    out, reference = ours(x), timms(x)
    for y in (out, reference):
        kept = (y != 0).flatten(1).all(dim=1)
        assert ((y == 0).flatten(1).all(dim=1) | kept).all()  # a whole sample, never part of one
        torch.testing.assert_close(y[kept], x[kept] / 0.7)
        # kept with probability 0.7: within 5 standard deviations of the binomial
        assert abs(kept.float().mean().item() - 0.7) < 5 * math.sqrt(0.7 * 0.3 / len(x))
    assert torch.equal(ours.eval()(x), x) and torch.equal(timms.eval()(x), x)
    ours.bfloat16().to("meta")  # the rate follows the device, keeps fp32
    assert (ours.keep_prob.device.type, ours.keep_prob.dtype, ours.scale.dtype) == ("meta", torch.float32,
                                                                                     torch.float32)


def blocks(rates) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[Block(16, 2, drop_path=rate) for rate in rates]).train()


def test_blocks_of_different_rates_compile_once_and_match_eager():
    import torch._inductor.config
    from torch._dynamo.utils import counters

    plain = blocks((0.1, 0.2, 0.3))
    assert tensor_rate_drop_paths(plain) == 6 and not any(isinstance(m, DropPath) for m in plain.modules())
    assert plain.state_dict().keys() == blocks((0.1, 0.2, 0.3)).state_dict().keys()
    compiled = copy.deepcopy(plain)
    for block in compiled:
        block.compile(dynamic=False)
    x = torch.randn(8, 5, 16)
    results = []
    torch._dynamo.reset()
    counters.clear()
    with torch._inductor.config.patch(fallback_random=True, compile_threads=1):  # the eager draws, compiled
        for model in (plain, compiled):
            torch.manual_seed(1)
            inputs = x.clone().requires_grad_(True)
            model(inputs).square().sum().backward()
            results.append([inputs.grad, *(p.grad for p in model.parameters())])
    assert counters["stats"]["unique_graphs"] == 1  # one graph for the three blocks, not one per rate
    for eager, fused in zip(*results):
        torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-5)  # fp32, reductions fused in another order
    assert results[0][0].abs().sum() > 0
