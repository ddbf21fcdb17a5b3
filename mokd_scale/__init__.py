"""mokd_scale: Multi-Mode Online Knowledge Distillation (CVPR 2023) with DeepSpeed, WebDataset and Slurm."""
import os
import sys


def _prefer_interpreter_tools() -> None:
    """DeepSpeed JIT-builds its C++ ops with the first `ninja` on PATH, and a build made by another
    ninja version is rebuilt (minutes). Putting this interpreter's bin/ first makes every process of
    an environment (activated or not, under Slurm or pytest) share one build cache."""
    bin_dir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if not path.startswith(bin_dir + os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + path


_prefer_interpreter_tools()
