"""Export a trained backbone from a mokd_scale checkpoint as a timm model folder.

    mokd-export --checkpoint runs/mokd/checkpoints --network a --out exports/vit_a
    mokd-export --checkpoint runs/mokd/checkpoints --network b --student --out exports/r152_student

OUT receives model.safetensors (the timm state dict, fp32) and config.json (architecture,
create_model arguments, input size, interpolation, crop, mean and std): the layout timm reads
from a local folder, so one line rebuilds the backbone with its weights,

    model = timm.create_model("local-dir:exports/vit_a", pretrained=True)

(num_classes=0: the model returns the pooled features used in training), and
timm.data.resolve_data_config(model=model) gives the evaluation preprocessing of the run. At that
input size a ViT computes exactly the training teacher's features; at other sizes timm resizes the
position embedding its own way (to a size, antialiased) where training resizes it by factor as DINO
does, so features there differ slightly.
config.json's "mokd" entry records the run, step, network and which weights were exported.

The teacher (the EMA network, the one to evaluate and fine-tune) is exported by default;
--student rebuilds the student's fp32 weights from its DeepSpeed engine save (any ZeRO stage).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXPORT_FILES = ("model.safetensors", "config.json")
# Fields of timm's registry entry that describe the authors' published weights, not ours.
SOURCE_FIELDS = ("tag", "hf_hub_id", "hf_hub_filename", "url", "file", "source", "license", "description",
                 "origin_url", "paper_ids", "paper_name", "notes")


class ExportError(ValueError):
    """A network or output folder that cannot be used; the message says what to do."""


def preprocessing(data: dict) -> dict:
    """The run's evaluation input (resize, center crop, normalisation) in timm's pretrained_cfg terms."""
    crop, resize = int(data["eval_crop"]), int(data["eval_resize"])
    return {"input_size": (3, crop, crop), "crop_pct": crop / resize, "crop_mode": "center",
            "interpolation": "bicubic", "mean": tuple(data["mean"]), "std": tuple(data["std"])}


def check_out(out: Path) -> None:
    """Refuse an OUT that would mix an export with other files (nothing already there is overwritten
    except an earlier export's own two files)."""
    if out.suffix == ".safetensors":
        raise ExportError(f"--out {out} names a file; it is the folder that receives model.safetensors and "
                          f"config.json (timm's local model layout), e.g. --out {out.with_suffix('')}")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a folder")
    others = sorted(p.name for p in out.iterdir() if p.name not in EXPORT_FILES) if out.is_dir() else []
    if others:
        raise ExportError(f"--out {out} already holds other files ({', '.join(others[:5])}); use a new folder")


def export(checkpoint_path: str | Path, network: str, out: str | Path, tag: str | None = None,
           student: bool = False) -> dict:
    """Write the backbone as a timm model folder `out`; returns a summary (arch, kwargs, step, load line)."""
    from timm.models import save_for_hf

    from mokd_scale.train import checkpoint
    from mokd_scale.models.backbone import create_timm_model, timm_kwargs
    from mokd_scale.models.weights import backbone_state_dict

    out = Path(out)
    check_out(out)
    tag_dir = checkpoint.find_tag(checkpoint_path, tag)
    state = checkpoint.read_state(tag_dir)
    teacher = checkpoint.teacher_weights(tag_dir, network, state)  # also checks the network name
    config = state["config"]
    net_cfg = config["networks"][network]
    source = checkpoint.student_weights(tag_dir, network) if student else teacher
    model = create_timm_model(net_cfg["arch"], net_cfg.get("arch_kwargs") or {}, drop_path_rate=0.0).eval()
    # Strict: every timm parameter and buffer comes from the checkpoint (a bf16 save becomes fp32).
    model.load_state_dict(backbone_state_dict(source), strict=True)
    kwargs = timm_kwargs(net_cfg["arch"], net_cfg.get("arch_kwargs") or {})
    cfg = {k: v for k, v in model.pretrained_cfg.items() if k not in SOURCE_FIELDS}
    model.pretrained_cfg = {**cfg, **preprocessing(config["data"])}
    record = {"network": network, "weights": "student" if student else "teacher",
              "step": int(state.get("step", -1)), "checkpoint": str(tag_dir.resolve())}
    save_for_hf(model, str(out), model_args=kwargs, safe_serialization=True, model_config={"mokd": record})
    return {**record, "arch": net_cfg["arch"], "timm_kwargs": kwargs, "out": str(out),
            "timm": f"timm.create_model('local-dir:{out}', pretrained=True)"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="OUTPUT/checkpoints of a run (or a step_X folder)")
    parser.add_argument("--tag", default=None, help="step_XXXXXXXX or a step number (default: latest)")
    parser.add_argument("--network", required=True, help="which network: a or b (see the recipe)")
    parser.add_argument("--student", action="store_true",
                        help="export the student from the DeepSpeed save instead of the EMA teacher")
    parser.add_argument("--out", required=True, help="output folder (model.safetensors + config.json)")
    args = parser.parse_args(argv)
    try:
        summary = export(args.checkpoint, args.network, args.out, args.tag, args.student)
    except ValueError as error:  # ExportError, CheckpointError: bad input, said in the message
        print(f"mokd-export: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote the {summary['weights']} backbone of network {args.network} ({summary['arch']}, step "
          f"{summary['step']}) to {summary['out']}\nuse it with:\n"
          f"    import timm\n    model = {summary['timm']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
