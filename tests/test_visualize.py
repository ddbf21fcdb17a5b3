"""mokd-visualize: attention weights read from timm's modules are the modules' own softmax rows (they sum
to 1, on the crop's grid, and reading them changes no output), and the tool writes pictures that are
not blank, one per image and a contact sheet for a folder."""
from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
from PIL import Image

from mokd_scale.config import load_config
from mokd_scale.eval.attention import captured_attention, class_token_attention, search_attention
from mokd_scale.method.forward import TeacherOutputs, cross_search_targets
from mokd_scale.models import Backbone, build_network
from mokd_scale.tools import export, visualize
from tests.test_export import write_fake_checkpoint

SMALL = ["mokd.out_dim=64", "mokd.proj_hidden_dim=32", "mokd.proj_bottleneck_dim=16", "mokd.search_depth=2"]
VIT_KWARGS = {"patch_size": 4, "img_size": 32, "embed_dim": 64, "depth": 2, "num_heads": 2}


@pytest.fixture(scope="module")
def pair():
    cfg = load_config("tiny_cpu", SMALL)
    torch.manual_seed(0)
    return cfg, {name: build_network(cfg, name, teacher=True).eval() for name in cfg.networks}


def reference_weights(attention, tokens: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) of a timm Attention on its (normed) input tokens, written out."""
    batch, count, _ = tokens.shape
    qkv = attention.qkv(tokens).reshape(batch, count, 3, attention.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = attention.q_norm(qkv[0]), attention.k_norm(qkv[1])
    return (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)


def test_captured_weights_are_the_modules_softmax_and_change_no_output():
    torch.manual_seed(0)
    backbone = Backbone("vit_tiny_patch16_224", VIT_KWARGS).eval()
    attention = backbone.model.blocks[-1].attn
    images = torch.randn(2, 3, 32, 32)
    inputs = []
    attention.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    with torch.no_grad():
        fused = backbone(images).pooled
        with captured_attention([attention]) as captured:
            explicit = backbone(images).pooled
    assert attention.fused_attn == fused_default() and len(captured) == 1
    torch.testing.assert_close(explicit, fused, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(captured[0], reference_weights(attention, inputs[-1]), rtol=1e-5, atol=1e-6)


def fused_default() -> bool:
    from timm.layers import use_fused_attn
    return use_fused_attn()


@pytest.mark.parametrize("size, registers", [(32, 0), (16, 0), (32, 2)])
def test_class_token_rows_sum_to_one_on_the_crops_grid(size, registers):
    torch.manual_seed(0)
    backbone = Backbone("vit_tiny_patch16_224", {**VIT_KWARGS, "reg_tokens": registers}).eval()
    result = class_token_attention(backbone, torch.randn(3, 3, size, size))
    assert result.grid == (size // 4, size // 4) and result.maps.shape == (3, 2, size // 4, size // 4)
    assert (result.maps >= 0).all() and (result.rest > 0).all()  # the class token keeps some weight itself
    torch.testing.assert_close(result.maps.sum(dim=(-2, -1)) + result.rest, torch.ones(3, 2))


def test_search_rows_sum_to_one_on_the_searched_grid_both_ways(pair):
    cfg, networks = pair
    torch.manual_seed(1)
    global_images, local_views = torch.randn(2, 3, 32, 32), torch.randn(3, 2, 3, 16, 16)
    for querying, searched in (("a", "b"), ("b", "a")):
        result = search_attention(networks[searched], networks[querying], global_images, local_views)
        grid = networks[searched].backbone(global_images).grid  # ViT a: 8x8; ResNet b (stride 16): 2x2
        tokens = 1 + grid[0] * grid[1]
        assert result.grid == grid and result.weights.shape == (3, 2, 2, 2, tokens, tokens)
        torch.testing.assert_close(result.weights.sum(-1), torch.ones(3, 2, 2, 2, tokens))
        for block in (None, 0, -1):
            rows = result.query_rows(block)
            assert rows.maps.shape == (3, 2, 2, *grid)
            torch.testing.assert_close(rows.maps.sum(dim=(-2, -1)) + rows.rest, torch.ones(3, 2, 2))
        # Reading the weights leaves the cross-search targets as training computes them.
        with torch.no_grad():
            tokens_y = networks[searched](global_images).search_tokens
            queries = networks[querying](local_views.flatten(0, 1)).summary.view(3, 2, -1)
            targets = TeacherOutputs(None, None, tokens_y.float())
            plain = cross_search_targets(networks[searched], targets, queries)
            with captured_attention([block.attn for block in networks[searched].search_head.blocks]):
                read = cross_search_targets(networks[searched], targets, queries)
        torch.testing.assert_close(read, plain, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def run_and_images(tmp_path_factory, pair):
    cfg, networks = pair
    root = tmp_path_factory.mktemp("visualize")
    write_fake_checkpoint(root / "run", cfg, networks)
    generator = np.random.default_rng(0)
    for folder in ("shirts", "shoes"):  # the same file name in two sub-folders
        (root / "images" / folder).mkdir(parents=True)
        pixels = generator.integers(0, 255, (40, 48, 3), dtype=np.uint8)  # not square: the tool crops
        Image.fromarray(pixels).save(root / "images" / folder / "0.jpg")
    (root / "images" / "notes.txt").write_text("not an image")
    return root


def run_tool(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = visualize.main(list(args))
    return code, out.getvalue(), err.getvalue()


def assert_picture(path, min_width: int) -> None:
    """A written PNG with coloured heat over it, not an empty canvas."""
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert pixels.shape[1] >= min_width
    saturated = np.abs(pixels[..., 0] - pixels[..., 2]) > 60  # the colour map's reds and oranges
    assert pixels.std() > 20 and saturated.mean() > 0.01, path


def test_mokd_visualize_draws_every_image_of_a_folder_and_a_contact_sheet(run_and_images):
    root = run_and_images
    code, out, err = run_tool("--checkpoint", str(root / "run"), "--images", str(root / "images"),
                              "--out", str(root / "pictures"))
    assert code == 0, err
    names = sorted(p.name for p in (root / "pictures").iterdir())
    assert names == ["contact_sheet.png", "shirts__0.png", "shoes__0.png"]
    assert "[1/2]" in out and "[2/2]" in out
    for name in names:
        # Widest row of a picture: the class-token section, 2 heads and their mean; of the sheet: 4 columns.
        assert_picture(root / "pictures" / name, min_width=300)


def test_mokd_visualize_from_an_export_and_its_errors(run_and_images):
    root = run_and_images
    for name in ("a", "b"):
        export.export(root / "run", name, root / f"export_{name}")
    image = root / "images" / "shoes" / "0.jpg"
    code, out, err = run_tool("--export", str(root / "export_a"), "--images", str(image), "--out", str(root / "e"))
    assert code == 0, err
    assert_picture(root / "e" / "0.png", min_width=300)
    assert not (root / "e" / "contact_sheet.png").exists()  # one image, no sheet
    errors = {
        "nothing to draw": ["--export", str(root / "export_b"), "--images", str(image)],
        "does not exist": ["--checkpoint", str(root / "run"), "--images", str(root / "none")],
        "['c'] not in this run": ["--checkpoint", str(root / "run"), "--images", str(image), "--networks", "a,c"],
        "not a mokd-export folder": ["--export", str(root / "images"), "--images", str(image)],
        "do not run through the networks": ["--checkpoint", str(root / "run"), "--images", str(image),
                                            "--size", "30"],
    }
    for expected, args in errors.items():
        code, _, err = run_tool(*args, "--out", str(root / "bad"))
        assert code == 2 and expected in err, (expected, err)
