from kinship.data.loader import Batch, BatchPlan, StreamingLoader, TensorLoader
from kinship.data.store import DataError, ImageSet, load_split
from kinship.data.subsets import hide_unlabeled, labeled_subset

__all__ = [
    "Batch", "BatchPlan", "DataError", "ImageSet", "StreamingLoader", "TensorLoader",
    "hide_unlabeled", "labeled_subset", "load_split",
]
