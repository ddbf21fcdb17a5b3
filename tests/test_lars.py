"""LARS as the MOKD/BYOL lineage defines it: the trust ratio uses the norm of the whole update g + wd·w
(timm.optim.Lars divides by ‖g‖ + wd·‖w‖ instead, a different step), and groups without weight
decay (biases, norms) take plain momentum SGD."""
import torch

from mokd_scale.engine.lars import LARS


def test_lars_step_follows_the_update_norm_rule_and_skips_no_decay_groups():
    torch.manual_seed(0)
    weight, bias = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(4))
    lr, wd, eta, momentum = 0.5, 0.1, 0.001, 0.9
    optimizer = LARS([{"params": [weight], "weight_decay": wd, "apply_weight_decay": True},
                      {"params": [bias], "weight_decay": 0.0, "apply_weight_decay": False}],
                     lr=lr, momentum=momentum, trust_coefficient=eta)
    w, b = weight.detach().clone(), bias.detach().clone()
    buffers = {"w": torch.zeros_like(w), "b": torch.zeros_like(b)}
    for _ in range(2):
        weight.grad, bias.grad = torch.randn(4, 3), torch.randn(4)
        update = weight.grad + wd * w
        update = update * (eta * w.norm() / update.norm())
        buffers["w"] = momentum * buffers["w"] + update
        buffers["b"] = momentum * buffers["b"] + bias.grad
        w, b = w - lr * buffers["w"], b - lr * buffers["b"]
        optimizer.step()
        torch.testing.assert_close(weight.detach(), w)
        torch.testing.assert_close(bias.detach(), b)


def test_zero_norms_leave_the_update_unscaled():
    weight = torch.nn.Parameter(torch.zeros(3, 3))
    optimizer = LARS([{"params": [weight], "weight_decay": 0.0, "apply_weight_decay": True}], lr=1.0, momentum=0.0)
    weight.grad = torch.ones(3, 3)
    optimizer.step()  # ‖w‖ = 0: ratio 1, a plain SGD step instead of a frozen (or NaN) weight
    torch.testing.assert_close(weight.detach(), -torch.ones(3, 3))
