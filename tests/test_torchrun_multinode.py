"""The srun-free bootstrap: two torchrun launchers, one per "node", meeting at a master address.

Both launchers run on this machine (node ranks 0 and 1, one process each), as an admin would start
them by hand on two hosts that share the output folder.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
STEPS = 4
TINY = ["data.source=synthetic", "train.global_batch_size=16", "train.micro_batch_size=8", "train.log_every=1",
        "train.knn_every=0", f"train.steps={STEPS}", "train.checkpoint_every=2"]
TIMEOUT_S = 420  # a safety net: a first run on a fresh machine JIT-builds DeepSpeed ops (~2-3 min)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launcher_environment() -> dict[str, str]:
    # Slurm or an outer torchrun would otherwise take precedence over this launcher's variables.
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("SLURM_", "TORCHELASTIC_"))
           and key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    env["OMP_NUM_THREADS"] = "1"
    return env


def torchrun_node(node_rank: int, port: int, output_dir: Path, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--node-rank", str(node_rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
               "-m", "mokd_scale.train", "--config", "tiny_cpu",
               "--set", f"output_dir={output_dir}", *TINY]
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=REPO,
                            env=launcher_environment())


def test_two_torchrun_nodes_train_together(tmp_path):
    output_dir = tmp_path / "run"
    port = free_port()
    logs = [tmp_path / f"node{rank}.log" for rank in (0, 1)]
    nodes = [torchrun_node(rank, port, output_dir, logs[rank]) for rank in (0, 1)]
    try:
        codes = [node.wait(timeout=TIMEOUT_S) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()
    texts = [log.read_text(errors="replace") for log in logs]
    report = "\n".join(f"--- node {rank} (exit {node.returncode}):\n{text[-4000:]}"
                       for rank, (node, text) in enumerate(zip(nodes, texts)))
    assert codes == [0, 0], report
    assert "mokd-train rank 0/2 ready" in texts[0], report
    assert "mokd-train rank 1/2 ready" in texts[1], report
    metrics = output_dir / "metrics.jsonl"
    assert metrics.exists(), report
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip()]
    assert steps == list(range(1, STEPS + 1)), report
    latest = output_dir / "checkpoints" / "latest"
    assert latest.exists(), report
    assert latest.read_text().strip() == f"step_{STEPS:08d}"
    assert (output_dir / "checkpoints" / f"step_{STEPS:08d}").is_dir()
