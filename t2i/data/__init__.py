"""Data: the text-to-image-2M shard pipeline, the built-in shapes set, packing and inspection.

    from t2i.data import build_loader, ShapesSpec, DataError
"""

from t2i.data.errors import BAD_KINDS, BadSample, DataError
from t2i.data.loader import DataStats, ShapesLoader, ShardLoader, build_loader
from t2i.data.shapes import ShapeAttrs, ShapesSpec

__all__ = ["BAD_KINDS", "BadSample", "DataError", "DataStats", "ShapeAttrs", "ShapesLoader",
           "ShapesSpec", "ShardLoader", "build_loader"]
