"""Weighted k-NN accuracy of a checkpoint's teacher backbones (k=20, T=0.07 by default).

    mokd-eval-knn --checkpoint runs/mokd/checkpoints
    mokd-eval-knn --checkpoint runs/mokd/checkpoints --random-init   # baseline
    mokd-eval-knn --checkpoint runs/mokd/checkpoints --student       # the students instead of the teachers
    torchrun --nproc-per-node 8 -m mokd_scale.tools.eval_knn --checkpoint ... --train-shards ... --val-shards ...

Memory bank: the checkpoint config's data.knn_train_shards (else data.train_shards);
queries: data.val_shards; override with --train-shards / --val-shards. Prints one JSON
object: {"a": {"top1", "top5"}, "b": {...}, "step", "tag", "random_init"} (on rank 0).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mokd_scale.config import add_set_argument


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="OUTPUT/checkpoints of a run (or a step_X folder)")
    parser.add_argument("--tag", default=None, help="step_XXXXXXXX or a step number (default: latest)")
    parser.add_argument("--train-shards", default=None,
                        help="shards of the labelled training set (default: from the checkpoint's config)")
    parser.add_argument("--val-shards", default=None, help="shards of the validation set (default: config)")
    parser.add_argument("--networks", default="", help="comma-separated networks to evaluate (default: all of the run's)")
    parser.add_argument("--random-init", action="store_true",
                        help="same architectures with fresh random weights (the untrained baseline)")
    parser.add_argument("--seed", type=int, default=None, help="seed of --random-init (default: config seed)")
    parser.add_argument("--student", action="store_true",
                        help="the students' weights instead of the EMA teachers' (what the optimizer has reached; a "
                             "teacher early in a run still holds much of its initial weights)")
    parser.add_argument("--batch-size", type=int, default=None, help="eval batch per rank (default: eval.batch_size)")
    parser.add_argument("--max-train-samples", type=int, default=None, help="cap of the train set (0: all)")
    parser.add_argument("--max-val-samples", type=int, default=None, help="cap of the val set (0: all)")
    add_set_argument(parser, "fields of the checkpoint's config (e.g. data.workers=2)")
    parser.add_argument("--out", default=None, help="also write the JSON result to this file")


def config_overrides(args: argparse.Namespace) -> list[str]:
    """CLI flags as config overrides (applied on top of the checkpoint's resolved config)."""
    overrides = list(args.set)
    if args.train_shards is not None:
        overrides.append(f"data.knn_train_shards={args.train_shards}")
        overrides.append(f"data.train_shards={args.train_shards}")
    if args.val_shards is not None:
        overrides.append(f"data.val_shards={args.val_shards}")
    for flag, key in (("batch_size", "eval.batch_size"), ("max_train_samples", "eval.max_train_samples"),
                      ("max_val_samples", "eval.max_val_samples")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    return overrides


def load_teachers(args: argparse.Namespace, device):
    """-> (config, {name: teacher MokdNetwork on device, eval mode}, run info for the JSON)."""
    import torch

    step_dir, state, config = checkpoint_config(args.checkpoint, args.tag, config_overrides(args))
    names = [n.strip() for n in args.networks.split(",") if n.strip()] or list(config.networks)
    torch.manual_seed(config.seed if args.seed is None else args.seed)
    weights = "random" if args.random_init else "student" if args.student else "teacher"
    networks = teacher_networks(config, state, names, device, weights, step_dir)
    info = {"step": int(state.get("step", -1)), "tag": step_dir.name, "random_init": bool(args.random_init),
            "weights": weights}
    return config, networks, info


def checkpoint_config(checkpoint_path, tag: str | None, overrides: list[str]):
    """-> (tag folder, its MOKD state, its resolved config with `overrides` applied and checked)."""
    from mokd_scale.config import apply_override, from_dict, validate
    from mokd_scale.train.checkpoint import find_tag, read_state

    step_dir = find_tag(checkpoint_path, tag)
    state = read_state(step_dir)
    raw = state["config"]
    for item in overrides:
        apply_override(raw, item)
    config = from_dict(raw)
    validate(config)
    return step_dir, state, config


def teacher_networks(config, state: dict, names: list[str], device, weights: str = "teacher",
                     step_dir=None) -> dict:
    """{name: network `name` on device, eval mode}, with weights "teacher" (its EMA teacher from `state`),
    "student" (the student's fp32 weights from its engine save in `step_dir`) or "random"."""
    from mokd_scale.models import build_network
    from mokd_scale.train.checkpoint import student_weights

    unknown = [n for n in names if n not in state["teachers"]]
    if unknown:
        raise ValueError(f"unknown network(s) {unknown}: this checkpoint holds {sorted(state['teachers'])}")
    networks = {}
    for name in names:
        network = build_network(config, name, teacher=True)
        if weights == "student":
            network.load_state_dict(student_weights(step_dir, name), strict=True)
        elif weights == "teacher":
            network.load_state_dict(state["teachers"][name], strict=True)
        networks[name] = network.to(device).eval()
    return networks


def run_on_teachers(tool: str, args: argparse.Namespace, evaluate) -> int:
    """The eval tools' shared main: load the teachers on every rank, call
    evaluate(config, networks, info) (a collective), print its JSON once."""
    from mokd_scale.runtime import dist

    info = dist.init_distributed()
    try:
        config, networks, run = load_teachers(args, info.device)
        result = evaluate(config, networks, info)
    except (ValueError, FileNotFoundError) as error:
        print(f"{tool}: error: {error}", file=sys.stderr)
        return 2
    finally:
        dist.destroy()
    if info.is_main:
        text = json.dumps({**result, **run})
        print(text, flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(parser)
    args = parser.parse_args(argv)

    def evaluate(config, networks, info):
        from mokd_scale.eval.knn import evaluate_knn
        return evaluate_knn(networks, config, info.rank, info.world_size, info.device)

    return run_on_teachers("mokd-eval-knn", args, evaluate)


if __name__ == "__main__":
    sys.exit(main())
