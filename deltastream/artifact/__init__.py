"""The delta artifact: a zarr v3 store (layout, codecs, manifest)."""

from .manifest import FORMAT_NAME, FORMAT_VERSION, Manifest, TensorEntry, load_manifest

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "Manifest", "TensorEntry", "load_manifest"]
