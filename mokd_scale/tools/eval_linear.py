"""Linear probe: a linear classifier on frozen teacher features, trained on cached features.

    mokd-eval-linear --checkpoint runs/mokd/checkpoints [--epochs 30] [--random-init]

Features (no augmentation) are extracted once from the train and val shards on all ranks
and gathered: ViT = class tokens of the last 4 blocks (each after the final norm),
concatenated, as in DINO's linear evaluation; CNN = the pooled last stage. The classifier
then trains on those tensors with SGD (momentum 0.9, cosine lr), which takes seconds, and
reports val top-1 as JSON. Every rank trains the same seeded classifier on the same
gathered features, so ranks agree without further communication.

Deviation from DINO: DINO trains the linear layer through the frozen network on augmented
crops for 100 epochs; caching un-augmented features is much cheaper and ranks backbones
the same way, but gives somewhat lower absolute numbers.
"""
from __future__ import annotations

import argparse
import math
import sys

import torch
from torch import nn

from mokd_scale.tools.eval_knn import add_checkpoint_arguments, run_on_teachers

VIT_BLOCKS = 4


class LinearProbeFeatures(nn.Module):
    """The probe's input for one backbone: ViT last-4 class tokens, CNN pooled output."""

    def __init__(self, timm_model: nn.Module, is_vit: bool):
        super().__init__()
        self.model = timm_model
        self.is_vit = is_vit
        self.blocks = min(VIT_BLOCKS, len(timm_model.blocks)) if is_vit else 1
        self.num_features = timm_model.num_features * self.blocks

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self.is_vit:
            return self.model(images)
        layers = self.model.forward_intermediates(images, indices=self.blocks, return_prefix_tokens=True,
                                                  norm=True, intermediates_only=True, output_fmt="NLC")
        return torch.cat([prefix[:, 0] for _, prefix in layers], dim=1)


def train_linear(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int, epochs: int, lr: float,
                 batch_size: int, weight_decay: float, seed: int) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    """SGD on standardised features; returns (classifier, feature mean, feature std)."""
    mean, std = train_x.mean(dim=0), train_x.std(dim=0).clamp_min(1e-6)
    inputs = (train_x - mean) / std
    generator = torch.Generator().manual_seed(seed)
    classifier = nn.Linear(inputs.shape[1], num_classes).to(inputs.device)
    nn.init.zeros_(classifier.weight)
    nn.init.zeros_(classifier.bias)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(inputs.shape[0] / batch_size)
    total = epochs * steps_per_epoch
    step = 0
    for _ in range(epochs):
        order = torch.randperm(inputs.shape[0], generator=generator).to(inputs.device)
        for start in range(0, inputs.shape[0], batch_size):
            for group in optimizer.param_groups:  # cosine decay per step
                group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * step / total))
            batch = order[start:start + batch_size]
            loss = nn.functional.cross_entropy(classifier(inputs[batch]), train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    return classifier, mean, std


@torch.no_grad()
def top1(classifier: nn.Linear, mean: torch.Tensor, std: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    predictions = classifier((x - mean) / std).argmax(dim=1)
    return round(100.0 * float((predictions == y).double().mean()), 3)


def probe_features(networks: dict, device: torch.device) -> dict[str, LinearProbeFeatures]:
    return {name: LinearProbeFeatures(net.backbone.model, net.backbone.is_vit).to(device).eval()
            for name, net in networks.items()}


def run_probe(config, networks: dict, rank: int, world_size: int, device: torch.device, args) -> dict:
    from mokd_scale.data import build_eval_loader
    from mokd_scale.knn import collect_features

    models = probe_features(networks, device)
    batch_size = config.eval.batch_size

    def features_of(shards, max_samples):
        loader = build_eval_loader(shards, config.data, batch_size, rank, world_size)
        return collect_features(models, loader, device, world_size, max_samples, normalize=False)

    with torch.no_grad():
        train_x, train_y, _ = features_of(config.data.train_shards, config.eval.max_train_samples)
        val_x, val_y, _ = features_of(config.data.val_shards, config.eval.max_val_samples)
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    result = {}
    for name in models:
        classifier, mean, std = train_linear(train_x[name], train_y, num_classes, args.epochs, args.lr,
                                             args.linear_batch_size, args.weight_decay, args.seed or 0)
        result[name] = {"top1": top1(classifier, mean, std, val_x[name], val_y),
                        "train_top1": top1(classifier, mean, std, train_x[name], train_y),
                        "feature_dim": int(train_x[name].shape[1])}
    result["samples"] = {"train": int(train_y.shape[0]), "val": int(val_y.shape[0])}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(parser)
    parser.add_argument("--epochs", type=int, default=30, help="passes over the cached train features")
    parser.add_argument("--lr", type=float, default=0.1, help="peak SGD lr (cosine to 0)")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--linear-batch-size", type=int, default=256, help="classifier batch size")
    args = parser.parse_args(argv)
    return run_on_teachers("eval_linear", args, lambda config, networks, info: run_probe(
        config, networks, info.rank, info.world_size, info.device, args))


if __name__ == "__main__":
    sys.exit(main())
