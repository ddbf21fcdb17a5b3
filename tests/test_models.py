"""Backbone wrapper, projection head, search head, network assembly and parameter counts."""
from __future__ import annotations

import time

import pytest
import timm
import torch
import torch.nn.functional as F

from mokd_scale.config import load_config
from mokd_scale.models import Backbone, build_network, pair_search_dim
from mokd_scale.models.last_layer import WeightNormLinear
from mokd_scale.models.projection_head import ProjectionHead
from mokd_scale.models.summary import recipe_counts

VIT = "vit_tiny_patch16_224"
VIT_KWARGS = {"depth": 2}  # ViT-Ti width (192) and patching, fewer blocks for speed
CNN = "resnet18"


def small_config(**network_overrides):
    """tiny_cpu with real-size archs (vit_tiny 192 wide, resnet18) and small heads."""
    overrides = [f"networks.a.arch={VIT}", "networks.a.arch_kwargs={depth: 2}",
                 f"networks.b.arch={CNN}", "networks.b.arch_kwargs={}",
                 "data.global_crop_size=224", "data.local_crop_size=96",
                 "mokd.out_dim=64", "mokd.proj_hidden_dim=32", "mokd.proj_bottleneck_dim=16",
                 "mokd.search_depth=1", "mokd.search_dim=0"]
    overrides += [f"{k}={v}" for k, v in network_overrides.items()]
    return load_config("tiny_cpu", overrides)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    cfg = small_config()
    return cfg, build_network(cfg, "a"), build_network(cfg, "b")


def test_vit_backbone_gives_class_token_and_patch_grid():
    torch.manual_seed(0)
    backbone = Backbone(VIT, VIT_KWARGS).eval()
    for size, grid in ((224, (14, 14)), (96, (6, 6)), (64, (4, 4))):
        images = torch.randn(2, 3, size, size)
        out = backbone(images)
        assert out.grid == grid and out.tokens.shape == (2, grid[0] * grid[1], 192)
        features = backbone.model.forward_features(images)  # after the final norm
        torch.testing.assert_close(out.pooled, features[:, 0])
        torch.testing.assert_close(out.tokens, features[:, 1:])


def test_cnn_backbone_gives_average_pool_and_feature_map_tokens():
    torch.manual_seed(0)
    backbone = Backbone(CNN).eval()
    images = torch.randn(2, 3, 96, 96)
    out = backbone(images)
    feature_map = backbone.model.forward_features(images)
    assert out.grid == (3, 3) and out.tokens.shape == (2, 9, 512)
    torch.testing.assert_close(out.pooled, feature_map.mean(dim=(2, 3)))
    # Row-major: token r*w + c is feature-map position (r, c).
    torch.testing.assert_close(out.tokens[:, 1 * 3 + 2], feature_map[:, :, 1, 2])


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown timm architecture"):
        Backbone("vit_imaginary_patch16")


def test_backbone_state_dict_loads_into_plain_timm_model():
    """Export strips `backbone.model.` and loads strictly into timm.create_model(arch, num_classes=0)."""
    cfg = small_config()
    network = build_network(cfg, "a")
    prefix = "backbone.model."
    exported = {k[len(prefix):]: v for k, v in network.state_dict().items() if k.startswith(prefix)}
    plain = timm.create_model(VIT, pretrained=False, num_classes=0, **VIT_KWARGS)
    plain.load_state_dict(exported, strict=True)


@pytest.mark.parametrize("size", [224, 96])
def test_network_output_shapes_for_both_kinds(pair, size):
    _, vit, cnn = pair
    images = torch.randn(2, 3, size, size)
    grid = {224: (14 * 14, 7 * 7), 96: (6 * 6, 3 * 3)}[size]
    for network, tokens in zip((vit, cnn), grid):
        with torch.no_grad():
            out = network(images)
        assert out.proj.shape == (2, 64) and out.search.shape == (2, 64)
        assert out.search_tokens.shape == (2, tokens, 192) and out.summary.shape == (2, 192)
        assert torch.isfinite(out.search).all()


def test_search_head_projects_cnn_channels_and_keeps_vit_width(pair):
    _, vit, cnn = pair
    assert isinstance(vit.search_head.channel_proj, torch.nn.Identity)
    assert cnn.search_head.channel_proj.weight.shape == (192, 512)
    assert len(vit.search_head.blocks) == 1 and vit.search_head.blocks[0].attn.num_heads == 192 // 64


def test_position_grid_is_the_backbone_token_grid_at_the_global_crop_size(pair):
    _, vit, cnn = pair
    assert vit.search_head.base_grid == (14, 14) and vit.search_head.position.shape == (1, 196, 192)
    assert cnn.search_head.base_grid == (7, 7) and cnn.search_head.position.shape == (1, 49, 192)
    dilated = small_config(**{"networks.b.arch_kwargs": "{output_stride: 16}", "data.global_crop_size": 64,
                              "data.local_crop_size": 32})
    assert build_network(dilated, "b").search_head.base_grid == (4, 4)


def test_position_embedding_is_resized_by_scale_factor_as_dino_resizes(pair):
    head = pair[2].search_head  # the CNN's: 7x7 base grid
    assert head.position_embedding((7, 7)) is head.position
    square = head.position.reshape(1, 7, 7, 192).permute(0, 3, 1, 2)
    for grid in ((3, 3), (2, 5), (14, 14)):
        factors = ((grid[0] + 0.1) / 7, (grid[1] + 0.1) / 7)
        expected = F.interpolate(square, scale_factor=factors, mode="bicubic", align_corners=False)
        resized = head.position_embedding(grid)
        assert resized.shape == (1, grid[0] * grid[1], 192)
        torch.testing.assert_close(resized, expected.permute(0, 2, 3, 1).reshape(1, -1, 192))
    # Resizing by factor is not resizing to the size: the sampling positions differ.
    by_size = F.interpolate(square, size=(3, 3), mode="bicubic", align_corners=False)
    assert (head.position_embedding((3, 3)) - by_size.permute(0, 2, 3, 1).reshape(1, 9, 192)).abs().max() > 1e-4


def test_query_token_changes_search_output(pair):
    head = pair[1].search_head.eval()
    tokens = torch.randn(2, 9, 192)
    query = torch.randn(2, 192)
    with torch.no_grad():
        plain, with_query = head(tokens), head(tokens, query=query)
        other_query = head(tokens, query=torch.randn(2, 192))
    assert plain.shape == with_query.shape == (2, 64)
    assert (plain - with_query).abs().max() > 1e-4
    assert (with_query - other_query).abs().max() > 1e-4
    with pytest.raises(ValueError, match="query"):
        head(tokens, query=torch.randn(2, 100))


def test_query_summary_vit_class_token_cnn_mean_projected_tokens(pair):
    _, vit, cnn = pair
    images = torch.randn(2, 3, 64, 64)
    vit.eval(), cnn.eval()
    out = vit(images)
    torch.testing.assert_close(out.summary, vit.backbone(images).pooled)
    out = cnn(images)
    projected = cnn.search_head.project(cnn.backbone(images).tokens)
    torch.testing.assert_close(out.summary, projected.mean(dim=1))
    assert not out.summary.requires_grad  # queries are always detached


def test_weight_norm_last_layer_uses_direction_only():
    layer = WeightNormLinear(8, 5, freeze_scale=True)
    x = torch.randn(3, 8)
    before = layer(x)
    with torch.no_grad():
        layer.direction.mul_(torch.rand(5, 1) + 0.5)  # row lengths must not matter
    torch.testing.assert_close(layer(x), before)
    torch.testing.assert_close(layer.weight().norm(dim=1), torch.ones(5))
    assert not layer.scale.requires_grad
    assert WeightNormLinear(8, 5, freeze_scale=False).scale.requires_grad


def test_projection_head_logits_are_bounded_cosines_with_optional_batchnorm():
    head = ProjectionHead(12, 32, 8, 40, use_bn=True)
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in head.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in ProjectionHead(12, 32, 8, 40).modules())
    logits = head(torch.randn(4, 12) * 100)
    assert logits.shape == (4, 40) and logits.abs().max() <= 1 + 1e-5


def test_last_layer_names_and_no_decay_names(pair):
    _, vit, _ = pair
    names = vit.last_layer_parameter_names()
    assert names == ["projection_head.last_layer.direction", "projection_head.last_layer.scale",
                     "search_head.last_layer.direction", "search_head.last_layer.scale"]
    no_decay = vit.no_weight_decay_parameter_names()
    assert "projection_head.mlp.0.bias" in no_decay and "search_head.norm.weight" in no_decay
    # Decayed like any 2-D weight, as the authors' parameter groups do; (K, 1) is 2-D.
    assert "projection_head.mlp.0.weight" not in no_decay and "search_head.last_layer.scale" not in no_decay


def test_weight_norm_scale_and_batchnorm_switches_per_head():
    default = build_network(small_config(**{"networks.a.proj_batchnorm": "false"}), "a")
    assert not default.projection_head.last_layer.scale.requires_grad  # DINO's default: frozen
    assert default.search_head.last_layer.scale.requires_grad  # the authors' search heads: trainable
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in default.projection_head.modules())
    cfg = small_config(**{"networks.a.proj_freeze_scale": "false", "networks.a.search_freeze_scale": "true",
                          "networks.a.proj_batchnorm": "true"})
    network = build_network(cfg, "a")
    assert network.projection_head.last_layer.scale.requires_grad
    assert not network.search_head.last_layer.scale.requires_grad
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in network.projection_head.modules())


def test_pair_search_dim_rules():
    assert pair_search_dim(small_config()) == 192
    assert pair_search_dim(small_config(**{"mokd.search_dim": 256})) == 256
    two_cnns = small_config(**{"networks.a.arch": "resnet18", "networks.a.arch_kwargs": "{}"})
    with pytest.raises(ValueError, match="no network is a token model"):
        pair_search_dim(two_cnns)
    with pytest.raises(ValueError, match="multiple of"):
        build_network(two_cnns, "a", search_dim=100)
    assert pair_search_dim(small_config(**{"mokd.mode": "independent"})) == 0
    three = small_config(**{"networks.c.arch": "vit_tiny_patch16_224",
                            "networks.c.arch_kwargs": "{patch_size: 4, img_size: 32, embed_dim: 128, depth: 1, num_heads: 2}"})
    with pytest.raises(ValueError, match=r"different widths \[128, 192\]"):  # every search head shares one width
        pair_search_dim(three)


def test_grad_checkpointing_gives_same_output_and_gradients():
    torch.manual_seed(0)
    plain = Backbone(VIT, VIT_KWARGS)
    checkpointed = Backbone(VIT, VIT_KWARGS, grad_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    assert checkpointed.model.grad_checkpointing and not plain.model.grad_checkpointing
    images = torch.randn(2, 3, 32, 32)
    for backbone in (plain, checkpointed):
        backbone(images).pooled.square().sum().backward()
    torch.testing.assert_close(checkpointed.model.blocks[0].attn.qkv.weight.grad,
                               plain.model.blocks[0].attn.qkv.weight.grad)


def test_flagship_parameter_counts_on_meta_device():
    start = time.perf_counter()
    counts = recipe_counts(load_config("vitl16_r152"))
    assert time.perf_counter() - start < 30
    vit, cnn = counts["a: vit_large_patch16_224"], counts["b: resnet152"]
    assert vit["backbone"] == 303_301_632 and cnn["backbone"] == 58_143_808
    # DINO head: 1024->2048->2048->256, then 256 x 65536 directions + 65536 scales.
    assert vit["projection_head"] == (1024 * 2048 + 2048) + (2048 * 2048 + 2048) + (2048 * 256 + 256) \
        + 65536 * 256 + 65536
    # The CNN's 1x1 projection, and its position grid of 7x7 instead of the ViT's 14x14.
    assert cnn["search_head"] - vit["search_head"] == 2048 * 1024 + 1024 + (49 - 196) * 1024
    assert vit["total"] == vit["backbone"] + vit["projection_head"] + vit["search_head"]


# ---------------------------------------------------------------- the search head as the method defines it

def layer_norm(x, norm):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-6) * norm.weight.double() + norm.bias.double()


def linear(x, layer):
    return x @ layer.weight.double().T + layer.bias.double()


def reference_search_logits(head, tokens, grid, query=None):
    """Float64, from the method's description: 1x1 projection, position embedding resized by scale
    factor from the base grid, query token in front (no position), pre-norm blocks with LayerNorm eps
    1e-6, closing LayerNorm, query dropped, patch tokens averaged, weight-normalised last layer."""
    x = tokens.double()
    if isinstance(head.channel_proj, torch.nn.Linear):
        x = linear(x, head.channel_proj)
    dim = x.shape[-1]
    base = head.position.double().reshape(1, *head.base_grid, dim).permute(0, 3, 1, 2)
    if tuple(grid) != head.base_grid:
        factors = tuple((g + 0.1) / b for g, b in zip(grid, head.base_grid))
        base = F.interpolate(base, scale_factor=factors, mode="bicubic", align_corners=False)
    x = x + base.permute(0, 2, 3, 1).reshape(1, -1, dim)
    if query is not None:
        x = torch.cat([query.double().unsqueeze(1), x], dim=1)
    for block in head.blocks:
        heads = block.attn.num_heads
        h = layer_norm(x, block.norm1)
        q, k, v = linear(h, block.attn.qkv).reshape(x.shape[0], x.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)
        attention = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        x = x + linear((attention @ v).transpose(1, 2).reshape(x.shape), block.attn.proj)
        x = x + linear(F.gelu(linear(layer_norm(x, block.norm2), block.mlp.fc1)), block.mlp.fc2)
    x = layer_norm(x, head.norm)
    pooled = (x[:, 1:] if query is not None else x).mean(dim=1)
    direction = head.last_layer.direction.double()
    weight = head.last_layer.scale.double() * direction / direction.norm(dim=1, keepdim=True)
    return pooled @ weight.T


@pytest.mark.parametrize("grid", [(7, 7), (3, 3)])
def test_search_head_computes_the_method_without_l2(pair, grid):
    head = pair[2].search_head  # the CNN's: 512 -> 192 projection, 7x7 base grid
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randn(2, grid[0] * grid[1], 512, generator=gen)
    query = torch.randn(2, 192, generator=gen)
    with torch.no_grad():
        head.last_layer.scale.mul_(torch.rand(head.last_layer.scale.shape, generator=gen) + 0.5)
        for q in (None, query):
            expected = reference_search_logits(head, tokens, grid, q)
            ours = head.double()(head.embed(tokens.double(), grid), query=None if q is None else q.double())
            head.float()
            torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-9)


def test_search_head_l2_switch_bounds_logits_by_the_scale():
    cfg = small_config(**{"mokd.search_l2_normalize": "true"})
    head = build_network(cfg, "b").search_head.eval()
    assert all(m.eps == 1e-6 for m in head.modules() if isinstance(m, torch.nn.LayerNorm))
    with torch.no_grad():
        logits = head(head.embed(torch.randn(3, 49, 512) * 10, (7, 7)))
    assert logits.abs().max() <= 1 + 1e-5


def test_teacher_never_drops_paths_and_starts_as_the_student():
    from mokd_scale.engine.learner import make_teacher
    cfg = small_config(**{"networks.a.drop_path_rate": 0.5})
    torch.manual_seed(0)
    student = build_network(cfg, "a").train()
    teacher = make_teacher(cfg, "a", student, pair_search_dim(cfg)).train()
    for (name, t), s in zip(teacher.state_dict().items(), student.state_dict().values()):
        torch.testing.assert_close(t, s, rtol=0, atol=0, msg=name)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        first, second = teacher(images), teacher(images)
        student_runs = student(images).proj, student(images).proj
    torch.testing.assert_close(first.proj, second.proj, rtol=0, atol=0)
    torch.testing.assert_close(first.search, second.search, rtol=0, atol=0)
    assert (student_runs[0] - student_runs[1]).abs().max() > 1e-4  # the student does drop paths
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in teacher.parameters())


def test_vit_resizes_its_position_embedding_for_local_crops_as_dino():
    torch.manual_seed(0)
    backbone = Backbone(VIT, VIT_KWARGS).eval()
    vit = backbone.model
    patches = vit.patch_embed(torch.randn(2, 3, 96, 96))  # (2, 6, 6, 192)
    square = vit.pos_embed[:, 1:].reshape(1, 14, 14, 192).permute(0, 3, 1, 2)
    resized = F.interpolate(square, scale_factor=(6.1 / 14, 6.1 / 14), mode="bicubic", align_corners=False)
    positions = torch.cat([vit.pos_embed[:, :1], resized.permute(0, 2, 3, 1).reshape(1, 36, 192)], dim=1)
    expected = torch.cat([vit.cls_token.expand(2, -1, -1), patches.reshape(2, 36, 192)], dim=1) + positions
    torch.testing.assert_close(vit._pos_embed(patches), expected)
    plain = timm.create_model(VIT, pretrained=False, num_classes=0, dynamic_img_size=True, **VIT_KWARGS).eval()
    plain.load_state_dict(vit.state_dict())
    images = torch.randn(2, 3, 96, 96)
    with torch.no_grad():  # timm alone resizes to the size with antialiasing: other local-crop features
        assert (backbone(images).pooled - plain.forward_head(plain.forward_features(images), pre_logits=True)).abs().max() > 1e-3
        images = torch.randn(2, 3, 224, 224)  # at the model's own size nothing is resized
        torch.testing.assert_close(backbone(images).pooled, plain.forward_head(plain.forward_features(images),
                                                                               pre_logits=True))
