"""timm backbone families: each one that gives a token grid passes the meta-device check and gives, on
real CPU tensors, the grid its features have; each one that cannot work stops with a ConfigError
naming the key. Tiny widths (arch_kwargs) or the smallest registered variant keep this fast."""
from __future__ import annotations

import pytest
import torch

from mokd_scale.config import ConfigError, load_config
from mokd_scale.models import Backbone, build_network
from mokd_scale.models.backbone import NCHW, NHWC, NLC, dino_pos_embed, timm_kwargs, token_grid
from mokd_scale.models.check import check_networks
from mokd_scale.models.compile import backbone_blocks

TINY_VIT = {"depth": 1, "embed_dim": 32, "num_heads": 2}
# The partner of every family: a slim ResNet-18 (stride 32 at 64 px: a 2x2 grid).
PARTNER = ("resnet18", "{channels: [8, 16, 32, 64]}")

# id: (arch, arch_kwargs, (global, local) crop sizes, layout, prefix tokens, pooled by a class token)
FAMILIES = {
    "vit": ("vit_tiny_patch16_224", TINY_VIT, (64, 32), NLC, 1, True),
    "vit_registers": ("vit_base_patch14_reg4_dinov2", TINY_VIT, (56, 28), NLC, 5, True),
    "vit_registers_no_class_token": ("vit_base_patch16_reg4_gap_256", TINY_VIT, (64, 32), NLC, 4, False),
    "deit": ("deit_tiny_patch16_224", TINY_VIT, (64, 32), NLC, 1, True),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", TINY_VIT, (64, 32), NLC, 2, True),
    "eva02": ("eva02_tiny_patch14_224", TINY_VIT, (56, 28), NLC, 1, True),
    "swin": ("swin_tiny_patch4_window7_224", {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]},
             (64, 32), NHWC, 0, False),
    "convnext": ("convnext_atto", {"dims": [8, 16, 32, 64], "depths": [1, 1, 1, 1]}, (64, 32), NCHW, 0, False),
    "efficientnet": ("efficientnet_b0", {}, (64, 32), NCHW, 0, False),
    "regnet": ("regnetx_002", {}, (64, 32), NCHW, 0, False),
    "mobilenetv3": ("mobilenetv3_small_050", {}, (64, 32), NCHW, 0, False),
    "hrnet": ("hrnet_w18_small", {}, (64, 32), NCHW, 0, False),
    "resnet": ("resnet18", {"channels": [8, 16, 32, 64]}, (64, 32), NCHW, 0, False),
}


def yaml_dict(kwargs: dict) -> str:
    return "{" + ", ".join(f"{k}: {list(v) if isinstance(v, (list, tuple)) else v}" for k, v in kwargs.items()) + "}"


def family_config(arch: str, arch_kwargs, crops=(64, 32), *extra):
    """The family as network a, paired with the slim ResNet-18 as b; tiny heads of a shared width 32."""
    kwargs = arch_kwargs if isinstance(arch_kwargs, str) else yaml_dict(arch_kwargs)
    return load_config("tiny_cpu", [
        f"networks.a.arch={arch}", f"networks.a.arch_kwargs={kwargs}",
        f"networks.b.arch={PARTNER[0]}", f"networks.b.arch_kwargs={PARTNER[1]}",
        f"data.global_crop_size={crops[0]}", f"data.local_crop_size={crops[1]}",
        "mokd.out_dim=32", "mokd.proj_hidden_dim=32", "mokd.proj_bottleneck_dim=16", "mokd.search_depth=1",
        "mokd.search_dim=32", "mokd.search_head_dim=16", "networks.a.drop_path_rate=0.1", *extra])


def feature_map_grid(model, features: torch.Tensor, layout: str, images: torch.Tensor) -> tuple[int, int]:
    """The grid as timm lays out the features, found apart from Backbone's own code."""
    if layout == NCHW:
        return tuple(features.shape[2:])
    if layout == NHWC:
        return tuple(features.shape[1:3])
    last = model.forward_intermediates(images, indices=1, output_fmt="NCHW", intermediates_only=True)[-1]
    return tuple(last.shape[2:])


@pytest.mark.parametrize("family", FAMILIES)
def test_family_passes_the_meta_check_and_gives_its_feature_grid_on_cpu(family):
    arch, kwargs, crops, layout, prefix, class_token = FAMILIES[family]
    check_networks(family_config(arch, kwargs, crops))
    torch.manual_seed(0)
    backbone = Backbone(arch, kwargs, drop_path_rate=0.1).eval()
    kind = backbone.kind
    assert (kind.layout, kind.prefix_tokens, backbone.has_class_token) == (layout, prefix, class_token)
    assert backbone.is_token_model == (layout == NLC)
    for size in crops:
        images = torch.randn(2, 3, size, size)
        with torch.no_grad():
            out = backbone(images)
            features = backbone.model.forward_features(images)
            grid = feature_map_grid(backbone.model, features, layout, images)
        assert out.grid == grid == token_grid(arch, kwargs, size)  # the meta device's grid is the real one
        assert out.tokens.shape == (2, grid[0] * grid[1], backbone.token_dim)
        assert out.pooled.shape == (2, backbone.pooled_dim)
        if class_token:
            torch.testing.assert_close(out.pooled, backbone.model.forward_head(features, pre_logits=True))
        else:
            torch.testing.assert_close(out.pooled, out.tokens.mean(dim=1))
        if layout == NLC:  # the grid tokens follow the prefix tokens, in timm's order
            torch.testing.assert_close(out.tokens, features[:, prefix:])


def test_class_token_is_the_pooled_feature_after_the_final_norm():
    """EVA-02 pools by the mean in timm; MOKD builds it pooled by its class token, with the final norm
    on every token (as plain ViTs), and an explicit mean pooling of a class-token model is refused."""
    assert timm_kwargs("eva02_tiny_patch14_224", TINY_VIT) == {**TINY_VIT, "dynamic_img_size": True,
                                                                 "global_pool": "token"}
    backbone = Backbone("eva02_tiny_patch14_224", TINY_VIT).eval()
    images = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        features = backbone.model.forward_features(images)
        torch.testing.assert_close(backbone(images).pooled, features[:, 0])
    assert isinstance(backbone.model.fc_norm, torch.nn.Identity)
    with pytest.raises(ConfigError, match=r"networks\.a\.arch_kwargs.*global_pool"):
        check_networks(family_config("vit_tiny_patch16_224", {**TINY_VIT, "global_pool": "avg"}))


def test_only_plain_vits_take_dinos_position_resize():
    token_models = {family: spec for family, spec in FAMILIES.items() if spec[3] == NLC}
    patched = {family: getattr(Backbone(arch, kwargs).model._pos_embed, "__func__", None) is dino_pos_embed
               for family, (arch, kwargs, *_) in token_models.items()}
    assert patched == {"vit": True, "deit": True, "vit_registers": False, "vit_registers_no_class_token": False,
                       "deit_distilled": False, "eva02": False}


def test_package_arguments_go_only_to_models_that_take_them():
    # dynamic_img_size where the constructor has it (not for CNNs, whose exported kwargs stay as they were).
    assert timm_kwargs("vit_tiny_patch16_224", {"depth": 1}) == {"depth": 1, "dynamic_img_size": True}
    assert timm_kwargs("swin_tiny_patch4_window7_224", {}) == {"dynamic_img_size": True}
    assert timm_kwargs("resnet18", {}) == {} and timm_kwargs("hrnet_w18_small", {}) == {}
    # drop_path_rate: HRNet has no stochastic depth (its constructor refuses the argument).
    vit = Backbone("vit_tiny_patch16_224", {**TINY_VIT, "depth": 2}, drop_path_rate=0.3).model
    assert vit.blocks[-1].drop_path1.drop_prob == pytest.approx(0.3)  # timm: the rate at the last block
    assert Backbone("hrnet_w18_small", {}, drop_path_rate=0.3).kind.layout == NCHW


def test_channels_last_and_compile_regions_follow_the_kind():
    cnn, swin, eva = (Backbone(FAMILIES[f][0], FAMILIES[f][1]) for f in ("resnet", "swin", "eva02"))
    for backbone in (cnn, swin, eva):
        backbone.channels_last = True
    assert (cnn.channels_last, swin.channels_last, eva.channels_last) == (True, False, False)
    assert backbone_blocks(eva) == list(eva.model.blocks)
    assert len(backbone_blocks(cnn)) == 8  # ResNet-18's residual blocks
    with pytest.raises(ValueError, match="train.compile=false"):
        backbone_blocks(swin)


@pytest.mark.parametrize("family", ["eva02", "swin", "convnext", "hrnet"])
def test_full_network_forward_and_backward(family):
    arch, kwargs, crops, *_ = FAMILIES[family]
    cfg = family_config(arch, kwargs, crops)
    torch.manual_seed(0)
    network, partner = build_network(cfg, "a").train(), build_network(cfg, "b").train()
    global_crops, local_crops = torch.randn(2, 3, crops[0], crops[0]), torch.randn(2, 3, crops[1], crops[1])
    out, local, query = network(global_crops), network(local_crops), partner(local_crops).summary
    cross = network.search_head(out.search_tokens, query=query)
    loss = out.proj.sum() + out.search.sum() + local.proj.sum() + local.search.sum() + cross.sum()
    loss.backward()
    grads = [p.grad for p in network.backbone.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    assert out.search_tokens.shape[1:] == (network.search_head.base_grid[0] * network.search_head.base_grid[1], 32)


# ---------------------------------------------------------------- families and settings that cannot work

@pytest.mark.parametrize("arch, kwargs, crops, key, why", [
    ("levit_128s", {}, (64, 32), "networks.a.arch", "fixed input size"),  # attention biases of one size
    ("mixer_s16_224", {}, (64, 32), "networks.a.arch", "fixed input size"),  # token-mixing MLPs of one length
    ("cait_xxs24_224", {}, (64, 32), "networks.a.arch", "fixed input size"),
    ("crossvit_tiny_240", {}, (64, 32), "networks.a.arch", "no token grid"),  # a list of two branches
    ("vit_imaginary_patch16", {}, (64, 32), "networks.a.arch", "unknown timm architecture"),
    ("eva02_tiny_patch14_224", {**TINY_VIT, "dynamic_img_size": False}, (56, 28), "networks.a.arch_kwargs",
     "dynamic_img_size=False"),
    ("swin_tiny_patch4_window7_224", {"strict_img_size": True}, (64, 32), "networks.a.arch_kwargs",
     "strict_img_size=True"),
    ("hrnet_w18_small", {"output_stride": 16}, (64, 32), "networks.a.arch_kwargs", "do not fit"),
    ("eva02_tiny_patch14_224", TINY_VIT, (64, 32), "data.global_crop_size", "patch size 14"),
    ("convnext_atto", {}, (64, 16), "data.local_crop_size", "networks.a.arch_kwargs"),  # stride 32 on 16 px
])
def test_family_that_cannot_work_stops_with_a_config_error_naming_the_key(arch, kwargs, crops, key, why):
    with pytest.raises(ConfigError) as caught:
        check_networks(family_config(arch, kwargs, crops))
    message = str(caught.value)
    assert message.startswith(key) and why in message, message


def test_compile_of_a_family_it_cannot_split_stops_in_the_check():
    arch, kwargs, crops, *_ = FAMILIES["swin"]
    check_networks(family_config(arch, kwargs, crops))
    with pytest.raises(ConfigError, match=r"^train\.compile: .*swin.*train\.compile=false"):
        check_networks(family_config(arch, kwargs, crops, "train.compile=true"))


def test_hrnet_is_not_blamed_for_arch_kwargs_it_does_not_have():
    """Reported: HRNet stopped with advice to reset its (empty) arch_kwargs, while the cause was the
    drop_path_rate the package passed; the recipe default (0.1) now builds."""
    cfg = family_config("hrnet_w18_small", {}, (64, 32))
    assert cfg.networks.a.drop_path_rate == 0.1 and cfg.networks.a.arch_kwargs == {}
    check_networks(cfg)
