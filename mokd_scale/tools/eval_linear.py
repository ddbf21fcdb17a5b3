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
import sys

from mokd_scale.tools.eval_knn import add_checkpoint_arguments, run_on_teachers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(parser)
    parser.add_argument("--epochs", type=int, default=30, help="passes over the cached train features")
    parser.add_argument("--lr", type=float, default=0.1, help="peak SGD lr (cosine to 0)")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--linear-batch-size", type=int, default=256, help="classifier batch size")
    args = parser.parse_args(argv)

    def evaluate(config, networks, info):
        from mokd_scale.eval.linear_probe import run_probe
        return run_probe(config, networks, info.rank, info.world_size, info.device, args)

    return run_on_teachers("mokd-eval-linear", args, evaluate)


if __name__ == "__main__":
    sys.exit(main())
