"""Frozen feature extractors (phi in the paper) and where their weights come from."""
from .networks import BACKBONES, Backbone, BackboneSpec, backbone_names, build_backbone, fold_batchnorm, resolve

__all__ = ["BACKBONES", "Backbone", "BackboneSpec", "backbone_names", "build_backbone", "fold_batchnorm", "resolve"]
