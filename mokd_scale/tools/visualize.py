"""What the trained networks attend to, as pictures: mokd-visualize.

    mokd-visualize --checkpoint runs/mokd/checkpoints --images photo.jpg --out attention/
    mokd-visualize --checkpoint runs/mokd --images val_folder/ --out attention/ --networks a,b
    mokd-visualize --export exports/vit_a --images photos/ --out attention/

For every image, one PNG with
  (a) each ViT-like teacher's class-token attention in its last block, one panel per head and their
      mean (DINO's attention maps);
  (b) the search heads' cross-attention, both directions of every pair: network X's summary of a
      local crop (the query X sends in training) in network Y's search head over Y's global-crop token
      grid, for 3 local crops (the boxes); mean over heads, and over the blocks unless --search-block
      picks one; a panel's corner says the weight the query keeps on itself;
  (c) for a CNN that is Y, (b) shows its search head's attention over the CNN's own grid.
A folder also gets contact_sheet.png: a row per image, the first panel of each section.

The image's centred square is the global crop (data.global_crop_size px, or --size); the local crops
are boxes of it resized to data.local_crop_size (or --local-size). The networks are the checkpoint's
EMA teachers in eval mode; in training the query comes from X's student, whose EMA the teacher is.
An export (mokd-export) holds a backbone only: (a) alone, at its recorded input size.
How the weights are read: mokd_scale/eval/attention.py.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NamedTuple

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
# Local crops as (x0, y0, x1, y1) fractions of the global view: a quarter of its area each, inside
# the local crops' scale range of the recipes.
LOCAL_BOXES = {"centre": (0.25, 0.25, 0.75, 0.75), "top left": (0.0, 0.0, 0.5, 0.5),
               "bottom right": (0.5, 0.5, 1.0, 1.0)}
CONTACT_SHEET = "contact_sheet.png"
CONTACT_SHEET_ROWS = 48
LEGEND = {"class": "class token: the last block's softmax row of the class token over the patch tokens, per head "
                   "(teacher, eval mode).",
          "search": "X -> Y search: X's query for the boxed local crop in Y's search head, its softmax row over Y's "
                    "global-crop grid, mean over heads and {blocks}; 'self': the weight it keeps on itself.",
          "scale": "Each map is scaled to its own maximum ('max'); 'even': every token's weight if the row were "
                   "uniform."}


class VisualizeError(ValueError):
    """Bad input; the message says what to do."""


class Subject(NamedTuple):
    """What one run of the tool draws."""
    title: str
    backbones: dict  # name -> Backbone with a class token: (a)
    networks: dict  # name -> MokdNetwork with a search head: (b), (c)
    pairs: list  # (querying, searched) names
    arch: dict  # name -> architecture
    mean: tuple
    std: tuple
    global_size: int
    local_size: int


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mokd-visualize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a run folder, its checkpoints/ folder or a step_XXXXXXXX folder")
    source.add_argument("--export", help="a mokd-export folder (class-token attention only)")
    parser.add_argument("--tag", default=None, help="step_XXXXXXXX or a step number (default: latest)")
    parser.add_argument("--images", required=True, help="an image file, or a folder searched recursively")
    parser.add_argument("--out", required=True, help="folder for the PNGs")
    parser.add_argument("--networks", default="", help="comma-separated networks to draw (default: all of the run's)")
    parser.add_argument("--size", type=int, default=None, help="global crop px (default: the run's global crop size)")
    parser.add_argument("--local-size", type=int, default=None,
                        help="local crop px (default: the run's local crop size, scaled with --size)")
    parser.add_argument("--search-block", type=int, default=None,
                        help="search maps of this block only (0 = first, -1 = last; default: the mean over blocks)")
    parser.add_argument("--limit", type=int, default=0, help="at most this many images (0: all)")
    return parser.parse_args(argv)


# -------------------------------------------------------------------------------------------- sources
def checkpoint_subject(args) -> Subject:
    import torch

    from mokd_scale.tools.eval_knn import checkpoint_config, teacher_networks

    step_dir, state, config = checkpoint_config(args.checkpoint, args.tag, [])
    names = chosen_networks(args.networks, list(config.networks))
    networks = teacher_networks(config, state, names, torch.device("cpu"))
    global_size = args.size or config.data.global_crop_size
    local_size = args.local_size or round(config.data.local_crop_size * global_size / config.data.global_crop_size)
    searching = {name: net for name, net in networks.items() if net.search_head is not None}
    return Subject(title=f"{step_dir.parent.parent.name}/{step_dir.name}",
                   backbones={n: net.backbone for n, net in networks.items() if net.backbone.has_class_token},
                   networks=searching, pairs=[(x, y) for y in searching for x in searching if x != y],
                   arch={n: config.networks[n].arch for n in names}, mean=tuple(config.data.mean),
                   std=tuple(config.data.std), global_size=global_size, local_size=local_size)


def chosen_networks(text: str, available: list[str]) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()] or available
    unknown = [n for n in names if n not in available]
    if unknown:
        raise VisualizeError(f"--networks: {unknown} not in this run, which has {available}")
    return names


def export_subject(args) -> Subject:
    from mokd_scale.config import IMAGENET_MEAN, IMAGENET_STD
    from mokd_scale.models.backbone import Backbone
    from mokd_scale.models.weights import folder_config, folder_weights_file, read_state_file

    folder = Path(args.export)
    config, weights = folder_config(folder), folder_weights_file(folder)
    if weights is None or "architecture" not in config:
        raise VisualizeError(f"--export {folder}: not a mokd-export folder (model.safetensors and config.json)")
    arch = config["architecture"]
    kwargs = {k: v for k, v in (config.get("model_args") or {}).items() if k != "num_classes"}
    backbone = Backbone(arch, kwargs).eval()
    try:
        backbone.model.load_state_dict(read_state_file(weights), strict=True)
    except RuntimeError as error:  # torch's strict-load report: missing / unexpected / reshaped keys
        raise VisualizeError(f"--export {folder}: its weights do not fit {arch} with {kwargs}: "
                             f"{str(error).splitlines()[0]}") from None
    if not backbone.has_class_token:
        raise VisualizeError(f"--export {folder}: {arch} has no class token, and an export holds no search head: "
                             "nothing to draw; use --checkpoint of the run for its search-head maps")
    pretrained = config.get("pretrained_cfg") or {}
    size = args.size or int(pretrained.get("input_size", (3, 224, 224))[-1])
    return Subject(title=f"export {folder.name}", backbones={"export": backbone}, networks={}, pairs=[],
                   arch={"export": arch}, mean=tuple(pretrained.get("mean", IMAGENET_MEAN)),
                   std=tuple(pretrained.get("std", IMAGENET_STD)), global_size=size,
                   local_size=args.local_size or size // 2)


def image_paths(path: Path, limit: int) -> list[Path]:
    if not path.exists():
        raise VisualizeError(f"--images {path} does not exist")
    if path.is_file():
        return [path]
    found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise VisualizeError(f"--images {path}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in it")
    return found[:limit] if limit > 0 else found


# ------------------------------------------------------------------------------------------ the maps
def square_view(path: Path):
    """The image's centred square, as a uint8 (3, S, S) tensor."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB"))
    height, width = rgb.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return torch.from_numpy(rgb[top:top + side, left:left + side].copy()).permute(2, 0, 1)


def crop(view, box: tuple, size: int, mean: tuple, std: tuple):
    """A box of the view (fractions) resized as training resizes crops (antialiased bicubic), normalised."""
    import torch
    import torch.nn.functional as F

    side = view.shape[-1]
    x0, y0, x1, y1 = (round(f * side) for f in box)
    region = view[:, y0:y1, x0:x1].float().unsqueeze(0)
    resized = F.interpolate(region, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    resized = resized.clamp(0, 255) / 255
    return ((resized - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))[0]


def sections_of(subject: Subject, view, search_block: int | None) -> list:
    """Every section of one image's picture: (a) per class-token network, (b)/(c) per ordered pair."""
    global_crop = crop(view, (0.0, 0.0, 1.0, 1.0), subject.global_size, subject.mean, subject.std).unsqueeze(0)
    sections = [class_token_section(subject, name, global_crop) for name in subject.backbones]
    if subject.pairs:
        import torch
        local_views = torch.stack([crop(view, box, subject.local_size, subject.mean, subject.std)
                                   for box in LOCAL_BOXES.values()]).unsqueeze(1)  # (views, 1, 3, s, s)
        sections += [search_section(subject, pair, global_crop, local_views, search_block) for pair in subject.pairs]
    return sections


def class_token_section(subject: Subject, name: str, global_crop):
    from mokd_scale.eval.attention import class_token_attention
    from mokd_scale.tools.attention_figure import Panel, Section

    backbone = subject.backbones[name]
    maps = class_token_attention(backbone, global_crop).maps[0].numpy()  # (heads, h, w)
    even = f"even {1 / (maps[0].size + backbone.kind.prefix_tokens):.3f}"  # every token's weight if uniform
    panels = [Panel("mean of heads", maps.mean(0), corner=even)]
    panels += [Panel(f"head {i + 1}", head, corner=even) for i, head in enumerate(maps)]
    return Section(f"{name} ({subject.arch[name]})\nclass token", panels, f"{name} class token")


def search_section(subject: Subject, pair: tuple, global_crop, local_views, search_block: int | None):
    """Network `querying`'s queries of the local crops in network `searched`'s search head."""
    from mokd_scale.eval.attention import search_attention
    from mokd_scale.tools.attention_figure import Panel, Section

    querying, searched = pair
    rows = search_attention(subject.networks[searched], subject.networks[querying], global_crop,
                            local_views).query_rows(search_block)
    maps, kept = rows.maps[:, 0].mean(1).numpy(), rows.rest[:, 0].mean(1).numpy()  # mean over heads
    even = 1 / (maps[0].size + 1)  # every token's weight (the query's included) if uniform
    panels = [Panel(f"crop {i + 1} ({where})", maps[i], boxes=((box, str(i + 1)),),
                    corner=f"even {even:.3f}\nself {kept[i]:.3f}") for i, (where, box) in enumerate(LOCAL_BOXES.items())]
    return Section(f"{querying} -> {searched} search\n({subject.arch[searched]} grid)", panels,
                   f"{querying} -> {searched} search")


def legend(subject: Subject, search_block: int | None) -> str:
    lines = [LEGEND["class"]] if subject.backbones else []
    if subject.pairs:
        blocks = "over the blocks" if search_block is None else f"block {search_block} only"
        lines.append(LEGEND["search"].format(blocks=blocks))
    return "\n".join([*lines, LEGEND["scale"]])


# ----------------------------------------------------------------------------------------------- run
def output_name(path: Path, root: Path) -> str:
    """images/shirts/001.jpg under images/ -> shirts__001.png (names stay apart across sub-folders)."""
    relative = path.relative_to(root) if root.is_dir() else Path(path.name)
    return "__".join(relative.with_suffix("").parts) + ".png"


def visualize(args) -> list[Path]:
    from mokd_scale.tools.attention_figure import Panel, Section, draw_contact_sheet, draw_image

    subject = export_subject(args) if args.export else checkpoint_subject(args)
    if not subject.backbones and not subject.pairs:
        raise VisualizeError("nothing to draw: no network has a class token, and the run has no search heads "
                             "(one network, or mokd.mode=independent)")
    root, out = Path(args.images), Path(args.out)
    paths = image_paths(root, args.limit)
    text = legend(subject, args.search_block)
    boxes = tuple((box, str(i + 1)) for i, box in enumerate(LOCAL_BOXES.values())) if subject.pairs else ()
    shown = Section("input", [Panel("image", boxes=boxes)])  # the local crops whose queries are drawn
    written, sheet = [], []
    for index, path in enumerate(paths, 1):
        try:
            view = square_view(path)
        except OSError as error:
            print(f"[{index}/{len(paths)}] {path}: skipped, not a readable image ({error})", flush=True)
            continue
        sections = [shown, *checked_sections(subject, view, args.search_block)]
        image = view.permute(1, 2, 0).numpy()
        png = draw_image(image, sections, f"{subject.title}: {path.name}", text, out / output_name(path, root))
        written.append(png)
        sheet.append((path.stem, image, [first_panel(section) for section in sections]))
        print(f"[{index}/{len(paths)}] {path} -> {png}", flush=True)
    if root.is_dir() and sheet:
        rows = sheet[:CONTACT_SHEET_ROWS]
        note = f" (first {len(rows)} of {len(sheet)} images)" if len(sheet) > len(rows) else ""
        written.append(draw_contact_sheet(rows, f"{subject.title}{note}", text, out / CONTACT_SHEET))
    return written


def first_panel(section):
    """A section's first panel, titled for a contact sheet's column ("b -> a search: crop 1 (centre)")."""
    panel = section.panels[0]
    return panel._replace(title=f"{section.short}:\n{panel.title}") if section.short else panel


def checked_sections(subject: Subject, view, search_block: int | None) -> list:
    """sections_of, with a crop size the networks cannot take said as a usage error."""
    try:
        return sections_of(subject, view, search_block)
    except (RuntimeError, AssertionError) as error:  # timm asserts sizes, torch raises on shapes
        reason = (str(error).strip() or type(error).__name__).splitlines()[0]
        raise VisualizeError(f"crops of {subject.global_size} / {subject.local_size} px (--size / --local-size) do "
                             f"not run through the networks: {reason}; use the run's crop sizes or multiples of "
                             "the patch size") from None
    except IndexError as error:
        raise VisualizeError(f"--search-block {search_block}: {error}") from None


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        written = visualize(args)
    except ImportError as error:
        print(f"mokd-visualize: error: {error}; the pictures need matplotlib (pip install matplotlib)",
              file=sys.stderr)
        return 2
    except ValueError as error:  # VisualizeError, CheckpointError, UnsupportedAttention: said in the message
        print(f"mokd-visualize: error: {error}", file=sys.stderr)
        return 2
    if not written:
        print("mokd-visualize: error: no image could be read", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} PNG(s) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
