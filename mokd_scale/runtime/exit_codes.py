"""mokd-train's exit codes: every rank exits with the same one, and the Slurm job script reads them
(slurm/mokd_vitl_r152.sh: the deliberate stops are not restarted, 75 is requeued)."""
EXIT_CONFIG = 2  # bad config or usage, found before any process group starts
EXIT_NON_FINITE = 3  # non-finite loss; a diagnostic checkpoint is kept beside checkpoints/
EXIT_RESUME = 4  # checkpoints exist but none can be resumed
EXIT_SAVE_FAILED = 74  # a checkpoint could not be written; the previous one is intact
EXIT_PREEMPTED = 75  # checkpoint saved on a preemption signal: requeue
