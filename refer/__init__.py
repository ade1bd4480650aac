"""REFER API, datasets and demo data for referring remote-sensing image segmentation.

Kept light (no torch import): `from refer.dataset import ReferDataset, build_dataset` for the dataset.
"""
from .refer import REFER, category_id_of, load_instances, load_refs

__all__ = ['REFER', 'category_id_of', 'load_instances', 'load_refs']
