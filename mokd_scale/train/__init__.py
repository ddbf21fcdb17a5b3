"""mokd-train: the command line (cli), the run (loop), the optimizer step (step), the checkpointed state
(state, checkpoint, manifest), schedules and metrics. `python -m mokd_scale.train` runs the command.

Only the command line is imported here, so `mokd-train --help` loads neither torch nor DeepSpeed."""
from mokd_scale.train.cli import main

__all__ = ["main"]
