"""Export a trained backbone from a mokd_scale checkpoint as a plain timm state dict.

    mokd-export --checkpoint runs/mokd/checkpoints --network a --out vit.safetensors
    mokd-export --checkpoint runs/mokd/checkpoints --network b --student --out r152.safetensors

The teacher (the EMA network, the one to evaluate and fine-tune) is exported by default, from
step_X/mokd_state.pt. --student rebuilds the student's fp32 weights from the DeepSpeed engine
save under step_X/<network>/ (ZeRO-1/2/3 shards are merged). The file loads with strict=True
into the timm model this tool prints, which computes the same features as in training.

This module also holds the checkpoint-reading helpers used by eval_knn.py and eval_linear.py.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

BACKBONE_PREFIX = "backbone.model."
NETWORKS = ("a", "b")


class CheckpointError(ValueError):
    """A checkpoint folder, tag or network that cannot be used; the message says what to do."""


# ------------------------------------------------------------------ checkpoint reading
def resolve_step_dir(checkpoint: str | Path, tag: str | None = None) -> Path:
    """OUTPUT/checkpoints (or OUTPUT, or a step folder) + optional tag -> the step folder."""
    root = Path(checkpoint)
    if not root.exists():
        raise CheckpointError(f"checkpoint folder {root} does not exist: pass OUTPUT/checkpoints of a run")
    if (root / "mokd_state.pt").exists() and tag is None:
        return root  # already a step folder
    if not (root / "latest").exists() and (root / "checkpoints").is_dir():
        root = root / "checkpoints"
    if tag is None:
        latest = root / "latest"
        if not latest.exists():
            raise CheckpointError(f"{root} has no 'latest' file, so no complete checkpoint was written; "
                                  f"pass --tag step_XXXXXXXX of one of {available_tags(root)}")
        tag = latest.read_text().strip()
    if tag.isdigit():
        tag = f"step_{int(tag):08d}"
    step_dir = root / tag
    if not (step_dir / "mokd_state.pt").exists():
        raise CheckpointError(f"{step_dir}/mokd_state.pt not found: tag {tag!r} is missing or incomplete; "
                              f"available tags: {available_tags(root)}")
    return step_dir


def available_tags(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob("step_*") if (p / "mokd_state.pt").exists())


def load_mokd_state(step_dir: Path) -> dict:
    # weights_only=False: the state holds a plain config dict; only load checkpoints you trust.
    return torch.load(step_dir / "mokd_state.pt", map_location="cpu", weights_only=False)


def check_network(network: str, state: dict) -> None:
    if network not in state.get("teachers", {}):
        raise CheckpointError(f"unknown network {network!r}: this checkpoint holds "
                              f"{sorted(state.get('teachers', {}))}")


def backbone_state_dict(network_state: dict) -> dict[str, torch.Tensor]:
    """Full-network keys -> timm keys: keep `backbone.model.*` and strip that prefix."""
    result = {}
    for key, value in network_state.items():
        key = key.removeprefix("module.")  # engine saves may keep the DDP-style prefix
        if key.startswith(BACKBONE_PREFIX):
            result[key[len(BACKBONE_PREFIX):]] = value
    if not result:
        raise CheckpointError(f"no '{BACKBONE_PREFIX}*' keys in the saved network (found e.g. "
                              f"{list(network_state)[:3]}): not a mokd_scale MokdNetwork state")
    return result


def student_state_dict(step_dir: Path, network: str) -> dict[str, torch.Tensor]:
    """fp32 student weights from network's DeepSpeed engine save (any ZeRO stage)."""
    engine_dir = step_dir / network
    if not engine_dir.is_dir():
        raise CheckpointError(f"{engine_dir} not found: no DeepSpeed save of network {network!r} in {step_dir}")
    if list(engine_dir.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        # The engine saved with tag = network name under the step folder.
        return get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag=network)
    model_file = engine_dir / "mp_rank_00_model_states.pt"
    if not model_file.exists():
        raise CheckpointError(f"{engine_dir} holds neither ZeRO shards nor mp_rank_00_model_states.pt")
    # ZeRO stage 0: the module's full weights are in the model-states file.
    return torch.load(model_file, map_location="cpu", weights_only=False)["module"]


def timm_kwargs(net_cfg: dict) -> dict:
    """Keyword arguments that rebuild the training backbone in plain timm (num_classes=0)."""
    from mokd_scale.models.backbone import is_vit_arch

    kwargs = dict(net_cfg.get("arch_kwargs") or {})
    if is_vit_arch(net_cfg["arch"]):
        kwargs.setdefault("dynamic_img_size", True)  # as in training: any crop size works
    return kwargs


def timm_line(arch: str, kwargs: dict) -> str:
    extra = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    return f"timm.create_model({arch!r}, pretrained=False, num_classes=0{extra})"


def create_backbone(arch: str, kwargs: dict) -> torch.nn.Module:
    import timm

    return timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)


# ---------------------------------------------------------------------------- export
def export(checkpoint: str | Path, network: str, out: str | Path, tag: str | None = None,
           student: bool = False) -> dict:
    """Write the backbone to `out` (safetensors); returns a summary (arch, kwargs, step, line)."""
    from safetensors.torch import save_file

    if network not in NETWORKS:
        raise CheckpointError(f"unknown network {network!r}: use one of {list(NETWORKS)}")
    step_dir = resolve_step_dir(checkpoint, tag)
    state = load_mokd_state(step_dir)
    check_network(network, state)
    net_cfg = state["config"]["networks"][network]
    source = student_state_dict(step_dir, network) if student else state["teachers"][network]
    weights = backbone_state_dict(source)
    kwargs = timm_kwargs(net_cfg)
    # Prove the promise before writing: strict load into the printed timm model.
    create_backbone(net_cfg["arch"], kwargs).load_state_dict(weights, strict=True)
    # fp32 weights (a bf16 engine save becomes fp32); integer buffers such as BatchNorm's
    # num_batches_tracked keep their dtype.
    tensors = {k: (v.detach().float() if v.is_floating_point() else v.detach()).contiguous().clone()
               for k, v in weights.items()}
    metadata = {"arch": net_cfg["arch"], "timm_kwargs": json.dumps(kwargs), "network": network,
                "weights": "student" if student else "teacher", "step": str(state.get("step", "")),
                "checkpoint": str(step_dir)}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=metadata)
    return {**metadata, "timm_kwargs": kwargs, "timm": timm_line(net_cfg["arch"], kwargs), "out": str(out)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="OUTPUT/checkpoints of a run (or a step_X folder)")
    parser.add_argument("--tag", default=None, help="step_XXXXXXXX or a step number (default: latest)")
    parser.add_argument("--network", required=True, help="which network: a or b (see the recipe)")
    parser.add_argument("--student", action="store_true",
                        help="export the student from the DeepSpeed save instead of the EMA teacher")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    args = parser.parse_args(argv)
    try:
        summary = export(args.checkpoint, args.network, args.out, args.tag, args.student)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {summary['weights']} backbone of network {args.network} (step {summary['step']}) "
          f"to {summary['out']}\nuse it with:\n"
          f"    import timm, safetensors.torch\n"
          f"    model = {summary['timm']}\n"
          f"    model.load_state_dict(safetensors.torch.load_file({summary['out']!r}), strict=True)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
