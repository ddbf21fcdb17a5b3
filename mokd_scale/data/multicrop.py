"""DINO multi-crop augmentation, fast: same crop and colour statistics as DINO's recipe, less work.

DINO's recipe per image: 2 global crops + N local crops, each RandomResizedCrop (bicubic, ratio 3/4..4/3),
horizontal flip p=0.5, colour jitter (brightness .4, contrast .4, saturation .2, hue .1, random order)
with p=0.8, grayscale p=0.2, Gaussian blur (sigma U(0.1, 2)) with p = 1.0 / 0.1 / 0.5 (global 1 /
global 2 / locals), solarize p=0.2 on global 2 only.

Where the time goes and what we do instead (`mokd-bench data` measures both pipelines):
- every random decision is drawn first; crop boxes in full-resolution coordinates with the exact
  RandomResizedCrop rule, so crop statistics are DINO's by construction (tests compare them);
- the JPEG is decoded once, at the largest DCT reduction (1/2, 1/4, 1/8) that still leaves
  >= output-size pixels under every box: big photos decode much faster, boxes are rescaled;
- crop + resize is torch's antialiased bicubic on uint8 (~5x faster than PIL's, same pixels to
  within rounding) straight from the decoded buffer;
- brightness, contrast and solarize are 256-entry tables, saturation a PIL blend (all pixel-equal to
  torchvision's PIL path); hue is a cached 3-D colour table (see `_hue_fast`); grey crops are
  blurred as one channel;
- crops stay uint8 until the device: `normalize_crops` normalises there (4x fewer bytes to move).
"""
from __future__ import annotations

import dataclasses
import functools
import io
import math
import random

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageStat

CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
BLUR_SIGMA = (0.1, 2.0)
# DINO's ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1).
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0.4, 0.4, 0.2, 0.1
_JPEG_REDUCTIONS = (8, 4, 2)  # DCT scalings libjpeg can decode directly


@dataclasses.dataclass(frozen=True)
class CropRecipe:
    """How one of the crops of an image is made."""
    size: int
    scale: tuple[float, float]
    jitter_prob: float
    gray_prob: float
    blur_prob: float
    solarize_prob: float


def crop_recipes(data_cfg) -> list[CropRecipe]:
    """The 2 global recipes followed by `num_local_crops` local recipes, from the data config."""
    blur_global = tuple(data_cfg.blur_prob_global)
    if len(blur_global) != 2:
        raise ValueError(f"data.blur_prob_global must list 2 probabilities, got {blur_global!r}")
    common = dict(jitter_prob=data_cfg.color_jitter_prob, gray_prob=data_cfg.grayscale_prob)
    global_scale = tuple(data_cfg.global_crop_scale)
    local_scale = tuple(data_cfg.local_crop_scale)
    globals_ = [
        CropRecipe(data_cfg.global_crop_size, global_scale, blur_prob=blur_global[0],
                   solarize_prob=0.0, **common),
        CropRecipe(data_cfg.global_crop_size, global_scale, blur_prob=blur_global[1],
                   solarize_prob=data_cfg.solarize_prob_global2, **common),
    ]
    local = CropRecipe(data_cfg.local_crop_size, local_scale, blur_prob=data_cfg.blur_prob_local,
                       solarize_prob=0.0, **common)
    return globals_ + [local] * data_cfg.num_local_crops


def sample_crop_box(rng: random.Random, width: int, height: int, scale, ratio=CROP_RATIO):
    """(left, top, w, h) with the distribution of torchvision's RandomResizedCrop.get_params:
    10 tries of (area ~ U(scale), log-ratio ~ U(log ratio)), else a centred crop clamped to `ratio`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


@dataclasses.dataclass
class _CropPlan:
    """Every random decision for one crop, drawn before any pixel work."""
    box: tuple[int, int, int, int]
    flip: bool
    jitter: tuple | None  # (order, brightness, contrast, saturation, hue) or None
    gray: bool
    blur_sigma: float | None
    solarize: bool


def _draw_plan(rng: random.Random, recipe: CropRecipe, width: int, height: int) -> _CropPlan:
    # The draw order mirrors DINO's transform order (crop, flip, jitter, gray, blur, solarize).
    box = sample_crop_box(rng, width, height, recipe.scale)
    flip = rng.random() < 0.5
    jitter = None
    if rng.random() < recipe.jitter_prob:
        order = rng.sample(range(4), 4)
        jitter = (order,
                  rng.uniform(max(0.0, 1 - BRIGHTNESS), 1 + BRIGHTNESS),
                  rng.uniform(max(0.0, 1 - CONTRAST), 1 + CONTRAST),
                  rng.uniform(max(0.0, 1 - SATURATION), 1 + SATURATION),
                  rng.uniform(-HUE, HUE))
    gray = rng.random() < recipe.gray_prob
    blur_sigma = rng.uniform(*BLUR_SIGMA) if rng.random() < recipe.blur_prob else None
    solarize = rng.random() < recipe.solarize_prob
    return _CropPlan(box, flip, jitter, gray, blur_sigma, solarize)


# ---- pixel operations (PIL, uint8), each equal to torchvision's PIL implementation ----

def _apply_table(img: Image.Image, table: list[int]) -> Image.Image:
    """`img.point(table)` without Pillow re-rounding the 768 entries in Python on every call
    (that alone cost ~0.8 ms per image); falls back to `point` if Pillow's core API changes."""
    try:
        img.load()
        return img._new(img.im.point(table, None))
    except AttributeError:
        return img.point(table)


def _clip_table(values: np.ndarray) -> list[int]:
    return np.clip(values, 0, 255).astype(np.uint8).tolist() * 3


_IDENTITY = np.arange(256, dtype=np.float32)
_SOLARIZE_TABLE = [i if i < 128 else 255 - i for i in range(256)] * 3


def _brightness(img: Image.Image, factor: float) -> Image.Image:
    # PIL's blend with black truncates toward zero; the table does the same.
    return _apply_table(img, _clip_table(np.trunc(_IDENTITY * np.float32(factor))))


def _contrast(img: Image.Image, factor: float) -> Image.Image:
    mean = int(ImageStat.Stat(img.convert("L")).mean[0] + 0.5)
    return _apply_table(img, _clip_table(np.trunc(mean + np.float32(factor) * (_IDENTITY - mean))))


def _saturation(img: Image.Image, factor: float) -> Image.Image:
    return Image.blend(img.convert("L").convert("RGB"), img, factor)


def _hue(img: Image.Image, shift: float) -> Image.Image:
    # int() then wrap mod 256, as numpy's uint8 addition of hue*255 does in torchvision; shifting
    # the H band with a table on the 3-band HSV image saves torchvision's split/merge round trip.
    step = int(shift * 255) % 256
    table = [(i + step) % 256 for i in range(256)] + list(range(256)) * 2
    return _apply_table(img.convert("HSV"), table).convert("RGB")


# Hue through a 3-D colour lookup table: PIL's HSV->RGB conversion is the single most expensive colour
# op (~0.8 ms of a 224 px crop's 1.2 ms hue shift); a trilinear 3-D LUT is ~40% cheaper. The shift
# only ever takes 51 distinct values (int(hue * 255), as in torchvision), so each table is built once
# per worker by running the exact `_hue` on the 18^3 grid colours: exact at grid points, within
# ~0.6 grey levels on average elsewhere (tests/test_data_pipeline.py checks the tolerance).
_HUE_GRID = 18  # grid step 15: 255 / 17, so grid colours are integers


@functools.lru_cache(maxsize=None)
def _hue_grid_image() -> Image.Image:
    levels = np.arange(_HUE_GRID) * (255 // (_HUE_GRID - 1))
    blue, green, red = np.meshgrid(levels, levels, levels, indexing="ij")  # red varies fastest
    grid = np.stack([red, green, blue], axis=-1).reshape(1, -1, 3).astype(np.uint8)
    return Image.fromarray(grid)


@functools.lru_cache(maxsize=256)
def _hue_table(step: int) -> ImageFilter.Color3DLUT:
    shifted = np.asarray(_hue(_hue_grid_image(), step / 255.0 + 1e-9), dtype=np.float32) / 255.0
    return ImageFilter.Color3DLUT(_HUE_GRID, shifted.reshape(-1), channels=3)


def _hue_fast(img: Image.Image, shift: float) -> Image.Image:
    return img.filter(_hue_table(int(shift * 255) % 256))


def _color_jitter(img: Image.Image, jitter: tuple) -> Image.Image:
    order, brightness, contrast, saturation, hue = jitter
    for op in order:
        if op == 0:
            img = _brightness(img, brightness)
        elif op == 1:
            img = _contrast(img, contrast)
        elif op == 2:
            img = _saturation(img, saturation)
        else:
            img = _hue_fast(img, hue)
    return img


def _resize_box(source: torch.Tensor, box, size: int) -> np.ndarray:
    """Crop `box` (left, top, w, h; source pixels) of a (1,3,H,W) channels-last uint8 tensor and
    resize it to size x size: bicubic with antialiasing, which matches PIL's BICUBIC resize to within
    rounding and runs ~5x faster than PIL on uint8 (torch's vectorised uint8 path)."""
    left, top, w, h = box
    region = source[:, :, top:top + h, left:left + w]
    out = torch.nn.functional.interpolate(region, size=(size, size), mode="bicubic", antialias=True)
    return out[0].permute(1, 2, 0).numpy()  # HWC view, contiguous for a channels-last result


def _needs_pixel_ops(plan: _CropPlan) -> bool:
    return plan.jitter is not None or plan.gray or plan.blur_sigma is not None or plan.solarize


def _render_crop(source: torch.Tensor, scale_xy: tuple[float, float], plan: _CropPlan,
                 size: int) -> np.ndarray:
    sx, sy = scale_xy
    left, top, w, h = plan.box
    box = (int(round(left * sx)), int(round(top * sy)), max(1, int(round(w * sx))),
           max(1, int(round(h * sy))))
    pixels = _resize_box(source, box, size)
    if _needs_pixel_ops(plan):
        img = Image.fromarray(pixels)
        if plan.jitter is not None:
            img = _color_jitter(img, plan.jitter)
        if plan.gray:
            img = img.convert("L")  # blur and solarize act per channel: do them on one channel
        if plan.blur_sigma is not None:
            img = img.filter(ImageFilter.GaussianBlur(radius=plan.blur_sigma))
        if plan.solarize:
            img = _apply_table(img, _SOLARIZE_TABLE[:256] * len(img.getbands()))
        pixels = np.asarray(img)
        if plan.gray:
            pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    # Flip is last: every op above is mirror-symmetric, so the order does not change the result.
    return pixels[:, ::-1] if plan.flip else pixels


def _jpeg_reduction(plans: list[_CropPlan], sizes: list[int]) -> int:
    """Largest DCT reduction that keeps >= `size` source pixels along each side of every box."""
    room = min(min(p.box[2], p.box[3]) / s for p, s in zip(plans, sizes))
    return next((r for r in _JPEG_REDUCTIONS if r <= room), 1)


def open_image(data: bytes) -> Image.Image:
    """Open (header only) an encoded image; raises on bytes that are not an image."""
    return Image.open(io.BytesIO(data))


def decode_for_plans(img: Image.Image, plans: list[_CropPlan], sizes: list[int]):
    """Decode `img` at the smallest resolution the plans allow; returns ((1,3,H,W) uint8 tensor,
    (sx, sy) = decoded size / full size)."""
    width, height = img.size
    reduction = _jpeg_reduction(plans, sizes)
    if reduction > 1 and img.format == "JPEG":
        img.draft("RGB", (math.ceil(width / reduction), math.ceil(height / reduction)))
    img = img.convert("RGB")  # forces the (possibly reduced) decode; raises on corrupt data
    scale_xy = (img.size[0] / width, img.size[1] / height)
    # (1, 3, H, W) view with channels-last strides: what torch's fast uint8 resize wants.
    source = torch.from_numpy(np.array(img)).permute(2, 0, 1).unsqueeze(0)
    return source, scale_xy


class MultiCrop:
    """Callable: encoded image (or PIL image) + RNG -> list of uint8 HWC arrays, one per recipe."""

    def __init__(self, recipes: list[CropRecipe]):
        self.recipes = recipes
        self.sizes = [r.size for r in recipes]

    @classmethod
    def from_config(cls, data_cfg) -> "MultiCrop":
        return cls(crop_recipes(data_cfg))

    def __call__(self, image: bytes | Image.Image, rng: random.Random) -> list[np.ndarray]:
        img = open_image(image) if isinstance(image, (bytes, bytearray)) else image
        width, height = img.size
        plans = [_draw_plan(rng, recipe, width, height) for recipe in self.recipes]
        source, scale_xy = decode_for_plans(img, plans, self.sizes)
        return [_render_crop(source, scale_xy, plan, size) for plan, size in zip(plans, self.sizes)]


def stack_crops(per_sample: list[list[np.ndarray]]) -> list[torch.Tensor]:
    """Samples' crop lists -> one uint8 (b, 3, H, W) tensor per crop position."""
    stacked = []
    for position in range(len(per_sample[0])):
        batch = np.stack([crops[position] for crops in per_sample])  # (b, H, W, 3)
        stacked.append(torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous())
    return stacked


def normalize_crops(crops, device, dtype, mean, std) -> list[torch.Tensor]:
    """uint8 (b,3,H,W) crops -> normalised `dtype` tensors on `device`; the division happens there
    so that workers and the host->device copy move 4x fewer bytes."""
    scale = torch.tensor(std, device=device, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    shift = torch.tensor(mean, device=device, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    out = []
    for crop in crops:
        x = crop.to(device, non_blocking=True).float()
        out.append(((x - shift) / scale).to(dtype))
    return out
