"""Linear probe on frozen features: DINO's feature choice, a classifier trained on cached features.

Features (no augmentation) come from a backbone as in DINO's linear evaluation: ViT = class
tokens of the last 4 blocks (each after the final norm), concatenated; CNN = the pooled last
stage. The classifier trains on those cached tensors with SGD (momentum 0.9, cosine lr), which
takes seconds. mokd-eval-linear (mokd_scale/tools/eval_linear.py) runs it on a checkpoint.
"""
from __future__ import annotations

import math

import torch
from torch import nn

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
    from mokd_scale.eval.knn import collect_features

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
