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
                 "mokd.out_dim=64", "mokd.proj_hidden_dim=32", "mokd.proj_bottleneck_dim=16",
                 "mokd.search_depth=1", "mokd.search_dim=0"]
    overrides += [f"{k}={v}" for k, v in network_overrides.items()]
    return load_config("tiny_cpu", overrides)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    cfg = small_config()
    dim = pair_search_dim(cfg)
    return cfg, build_network(cfg.networks.a, cfg.mokd, dim), build_network(cfg.networks.b, cfg.mokd, dim)


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
    network = build_network(cfg.networks.a, cfg.mokd, pair_search_dim(cfg))
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


def test_position_embedding_is_bicubic_resize_of_base_grid(pair):
    head = pair[1].search_head
    base = head.position_embedding((14, 14))
    torch.testing.assert_close(base, head.position.flatten(2).transpose(1, 2))
    resized = head.position_embedding((3, 5))
    expected = F.interpolate(head.position, size=(3, 5), mode="bicubic", align_corners=False)
    assert resized.shape == (1, 15, 192)
    torch.testing.assert_close(resized, expected.flatten(2).transpose(1, 2))


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
    assert "projection_head.mlp.0.bias" in no_decay and "search_head.last_layer.scale" in no_decay
    assert "projection_head.mlp.0.weight" not in no_decay


def test_freeze_weight_norm_scale_switch():
    cfg = small_config(**{"networks.a.freeze_weight_norm_scale": "false"})
    network = build_network(cfg.networks.a, cfg.mokd, 192)
    assert network.projection_head.last_layer.scale.requires_grad
    assert network.search_head.last_layer.scale.requires_grad


def test_pair_search_dim_rules():
    assert pair_search_dim(small_config()) == 192
    assert pair_search_dim(small_config(**{"mokd.search_dim": 256})) == 256
    two_cnns = small_config(**{"networks.a.arch": "resnet18", "networks.a.arch_kwargs": "{}"})
    with pytest.raises(ValueError, match="both networks are CNNs"):
        pair_search_dim(two_cnns)
    with pytest.raises(ValueError, match="multiple of"):
        build_network(two_cnns.networks.a, two_cnns.mokd, 100)


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
    assert cnn["search_head"] - vit["search_head"] == 2048 * 1024 + 1024  # the CNN's 1x1 projection
    assert vit["total"] == vit["backbone"] + vit["projection_head"] + vit["search_head"]
