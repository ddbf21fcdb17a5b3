"""MOKD networks: timm backbones with a projection head and a search head."""
from mokd_scale.models.backbone import Backbone, BackboneKind, BackboneOutput, backbone_kind, is_vit_arch
from mokd_scale.models.network import MokdNetwork, NetworkOutput, build_network, pair_search_dim
from mokd_scale.models.projection_head import ProjectionHead
from mokd_scale.models.search_head import SearchHead

__all__ = ["Backbone", "BackboneKind", "BackboneOutput", "MokdNetwork", "NetworkOutput", "ProjectionHead", "SearchHead",
           "backbone_kind", "build_network", "is_vit_arch", "pair_search_dim"]
