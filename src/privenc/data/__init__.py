"""The data layer: image sources, tasks, splits, transforms and the image cache.

Entry points: :func:`prepare` (what training and verification call), :func:`open_source`
and :func:`inspect` (the ``privenc data inspect`` report). Sources: Places-365 in its
official layout, a class-per-folder tree, a CSV manifest and the embedded synthetic scenes.
"""

from privenc.data.base import Source
from privenc.data.cache import ImageCache, LazyImages, open_images
from privenc.data.dataset import ImageDataset, TaskData, open_source, prepare
from privenc.data.folder import FolderSource
from privenc.data.manifest import CsvSource
from privenc.data.places365 import Places365Source
from privenc.data.splits import make_splits, read_splits, write_splits
from privenc.data.summary import inspect
from privenc.data.tasks import Task, combine_tasks, parse_task, select
from privenc.data.transforms import eval_transform, train_transform
from privenc.errors import DataError

__all__ = [
    "CsvSource", "DataError", "FolderSource", "ImageCache", "ImageDataset", "LazyImages",
    "Places365Source", "Source", "Task", "TaskData", "combine_tasks", "eval_transform",
    "inspect", "make_splits", "open_images", "open_source", "parse_task", "prepare",
    "read_splits", "select", "train_transform", "write_splits",
]
