"""mokd-train: train a MOKD pair end to end.

    mokd-train --config tiny_cpu|r50_vits16|vitl16_r152|PATH.yaml [--set key=value ...] [--resume auto|none|PATH]
    mokd-train --print-config [--config R] [--set key=value ...]    the resolved recipe, every field explained

Launch with torchrun, with srun inside a Slurm job (see slurm/), or as one process.

Exit codes (every rank exits with the same one):
  0   finished (or stopped after train.stop_after_steps)
  2   bad config or usage (found before any process group starts)
  3   non-finite loss (a diagnostic checkpoint is kept beside checkpoints/)
  4   checkpoints exist but none can be resumed (the message says what is wrong and what to do)
  74  a checkpoint could not be written (disk full?); the previous one is intact
  75  preempted: checkpoint saved, requeue me
Anything else (a traceback, a signal) is a failure a restart may cure; slurm/mokd_vitl_r152.sh
restarts those, and only those, a bounded number of times.

Exit protocol: the ranks leave together. A checkpoint save returns on no rank before every rank's
files and `latest` are written, and after the run a final barrier waits for rank 0's logs to be
flushed, so a launcher that ends all ranks as soon as one exits (srun --kill-on-bad-exit, torchrun)
never cuts a write short.

This module imports neither torch nor DeepSpeed until a run starts: `--help` and `--print-config`
answer at once.
"""
from __future__ import annotations

import argparse
import os
import sys

from mokd_scale.runtime.exit_codes import EXIT_CONFIG
from mokd_scale.config import (Config, ConfigError, add_set_argument, load_config, sections_help,
                               validate_world_size, with_help)



def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mokd-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="recipe sections (see every field with --print-config):\n"
                                            + sections_help())
    parser.add_argument("--config", help="recipe name (mokd_scale/config/recipes/) or YAML path; required to train")
    add_set_argument(parser)
    parser.add_argument("--out", default=None, help="run folder (checkpoints, metrics); same as --set output_dir=OUT")
    parser.add_argument("--resume", default="auto",
                        help="auto: from OUTPUT/checkpoints/latest when present; none: fresh; or a checkpoint path")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved recipe as YAML with each field's help, and exit")
    args = parser.parse_args(argv)
    if args.config is None and not args.print_config:
        parser.error("--config is required to train (or use --print-config to see the fields)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = [*args.set, *([f"output_dir={args.out}"] if args.out else [])]
    try:
        if args.print_config:
            print(with_help(recipe_or_defaults(args.config, overrides)), end="")
            return 0
        config = load_config(args.config, overrides)
        validate_world_size(config, launch_world_size())
        check_models(config, args.resume)
    except (ConfigError, FileNotFoundError) as error:
        print(f"mokd-train: config error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    return run(config, args.resume)


def recipe_or_defaults(name: str | None, overrides: list[str]) -> Config:
    """--print-config without --config shows the built-in defaults (with any --set applied)."""
    if name is not None:
        return load_config(name, overrides)
    from mokd_scale.config import apply_override, from_dict, to_dict
    raw = to_dict(Config())
    for item in overrides:
        apply_override(raw, item)
    return from_dict(raw)


def launch_world_size() -> int:
    from mokd_scale.runtime.dist import launch_env
    return int(launch_env(dict(os.environ))["WORLD_SIZE"])


def check_models(config: Config, resume: str = "none") -> None:
    """Every network built on the meta device (no memory, no process group): a model-level mistake
    (arch_kwargs of another architecture, a pair with no shared search width, crops that do not fit
    the patch size, networks.X.init weights of another architecture, term gradients under ZeRO-3) stops here
    with the key to fix."""
    from mokd_scale.engine.term_gradients import check_term_gradients
    from mokd_scale.models.check import check_networks
    from mokd_scale.train.init_weights import check_initial_weights
    check_networks(config)
    check_initial_weights(config, resume)
    check_term_gradients(config)


def run(config: Config, resume: str) -> int:
    from mokd_scale.runtime import dist
    from mokd_scale.train.loop import train
    owns_process_group = not dist.is_dist()  # a caller's group (tests, notebooks) stays up
    info = dist.init_distributed(config.train.collective_timeout_s)
    try:
        return train(config, info, resume)
    finally:
        if owns_process_group:
            dist.destroy()


if __name__ == "__main__":
    sys.exit(main())
