from kinship.data.handle import DataInfo, TrainData
from kinship.data.loader import Batch, BatchPlan, LabeledPlan, TensorLoader
from kinship.data.store import ImageSet, load_split
from kinship.data.stream import FileImages, StreamingLoader
from kinship.data.subsets import hide_unlabeled, labeled_subset
from kinship.errors import DataError

__all__ = [
    "Batch",
    "BatchPlan",
    "DataError",
    "DataInfo",
    "FileImages",
    "ImageSet",
    "LabeledPlan",
    "StreamingLoader",
    "TensorLoader",
    "TrainData",
    "hide_unlabeled",
    "labeled_subset",
    "load_split",
]
