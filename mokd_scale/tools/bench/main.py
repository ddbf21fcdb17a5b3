"""mokd_scale benchmarks: JSON on stdout (or --out FILE), a readable table on stderr.

    mokd-bench step   [--config tiny_cpu] [--zero 0|1|2|3] [--nproc 2] [--steps 10] ...
        images/s, model FLOP/s and MFU of the MOKD step (Coordinator over two DeepSpeed Learners)
        against a plain torch-DDP loop of the same models and losses; `step --help` for all options.
    mokd-bench memory [--stages 0,1,2,3] [--nproc 2] ...
        measured optimizer-state bytes and peak memory per rank per ZeRO stage (tiny recipe), and
        the flagship's projected model-state memory per GPU on 4 nodes x 8 GPUs.
    mokd-bench ops    [--config vitl16_r152] [--zero 0,2] [--width tiny|recipe] ...
        operators dispatched per optimizer step, by phase: kernel-launching, views/metadata,
        collectives (the host overhead of the step, measured on any machine), ours against the DDP loop.
    mokd-bench gpu    [--micro-batches 32,64,128] [--variants eager,compile] [--budget 450] ...
        the flagship step on one GPU, eager and train.compile, one process per variant: images/s,
        MFU, peak memory, first-step (compile) seconds and the host's lead, in --budget seconds.
    mokd-bench data   [...]
        data-pipeline images/s per worker (bench/data.py).
    mokd-bench science [--steps 300] [--seeds 3] [--nproc 2] [--work science_out] ...
        MOKD vs independent training (plain DINO per network) on Fashion-MNIST, several seeds: final
        teacher k-NN top-1 per network and mode, and MOKD's gain (bench/science.py; resumable).

On a GPU machine: mokd-bench step --config vitl16_r152 --zero 2 \\
        --set train.micro_batch_size=16 data.num_local_crops=8 --steps 5 --warmup 2 --rounds 1
"""
from __future__ import annotations

import json
import sys

COMMANDS = ("step", "memory", "ops", "gpu", "data", "science")


def out_path(argv: list[str]) -> str:
    """--out FILE / --out=FILE, read here so that every sub-command writes its JSON the same way."""
    for index, arg in enumerate(argv):
        if arg == "--out" and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--out="):
            return arg.split("=", 1)[1]
    return ""


def emit(report: dict, table: str, path: str) -> None:
    print(table, file=sys.stderr, flush=True)
    text = json.dumps(report, indent=1, default=str)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")
    else:
        print(text, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        print(f"mokd-bench: first argument must be one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    if command == "data":
        from mokd_scale.tools.bench import data
        report = data.run_data_bench(rest)
        emit(report, data.data_table(report), out_path(rest))
        return 0
    if command == "science":
        from mokd_scale.tools.bench import science, science_report
        try:
            report = science.run_science_bench(rest)
        except science.BenchError as error:
            print(f"mokd-bench science: {error}", file=sys.stderr)
            return 2
        emit(report, science_report.science_table(report), out_path(rest))
        return 0
    if command == "step":
        from mokd_scale.tools.bench import step
        report = step.run_step_bench(rest)
        emit(report, step.step_table(report), out_path(rest))
        return 0
    if command == "ops":
        from mokd_scale.tools.bench import ops
        report = ops.run_ops_bench(rest)
        emit(report, ops.ops_table(report), out_path(rest))
        return 0
    if command == "gpu":
        from mokd_scale.tools.bench import gpu
        report = gpu.run_gpu_bench(rest)
        emit(report, gpu.gpu_table(report), out_path(rest))
        return 0
    from mokd_scale.tools.bench import memory
    report = memory.run_memory_bench(rest)
    emit(report, memory.memory_table(report), out_path(rest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
