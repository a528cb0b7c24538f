"""OCI images (layout folders, oci-archive and docker-save tarballs) unpacked into cached ext4 roots."""

from __future__ import annotations

from .cache import CachedImage, ImageCache
from .image import Image, Layer, host_architecture, read_image
from .layers import apply_layer
from .source import Source, open_source

__all__ = ["CachedImage", "ImageCache", "Image", "Layer", "host_architecture", "read_image", "apply_layer", "Source",
           "open_source"]
