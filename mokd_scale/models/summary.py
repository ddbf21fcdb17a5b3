"""Parameter counts per part of both networks of a recipe, without allocating weights.

    python -m mokd_scale.models.summary --config vitl16_r152 [--set mokd.out_dim=4096 ...]

Networks are built on the meta device, so even the flagship (ViT-L/16 + ResNet-152,
K = 65536) is counted in seconds on a CPU.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from mokd_scale.models.network import MokdNetwork, build_network, pair_search_dim

PARTS = ("backbone", "projection_head", "search_head")


def count(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def parameter_counts(network: MokdNetwork) -> dict[str, int]:
    """Parameters per part, plus the total and the trainable total (frozen scales excluded)."""
    counts = {part: count(getattr(network, part)) if getattr(network, part) is not None else 0 for part in PARTS}
    counts["total"] = count(network)
    counts["trainable"] = count(network, trainable_only=True)
    return counts


def recipe_counts(cfg) -> dict[str, dict[str, int]]:
    counts = {}
    for name, net in cfg.networks.items():
        with torch.device("meta"):
            network = build_network(cfg, name)
        counts[f"{name}: {net.arch}"] = parameter_counts(network)
    return counts


def format_table(counts: dict[str, dict[str, int]], search_dim: int, out_dim: int) -> str:
    columns = (*PARTS, "total", "trainable")
    header = f"{'network':<28}" + "".join(f"{c:>17}" for c in columns)
    lines = [f"search width D = {search_dim}, K = {out_dim}", header, "-" * len(header)]
    for name, row in counts.items():
        lines.append(f"{name:<28}" + "".join(f"{row[c]:>17,}" for c in columns))
    both = sum(row["total"] for row in counts.values())
    lines.append(f"both students: {both:,} parameters ({both / 1e6:.1f} M); each teacher is an equal-size fp32 copy")
    return "\n".join(lines)


def main(argv=None) -> None:
    from mokd_scale.config import add_set_argument, load_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="recipe name (e.g. vitl16_r152) or YAML path")
    add_set_argument(parser)
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.set)
    print(format_table(recipe_counts(cfg), pair_search_dim(cfg), cfg.mokd.out_dim))


if __name__ == "__main__":
    main()
