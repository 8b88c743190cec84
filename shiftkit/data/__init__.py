"""Tile IO and bundled sample data."""

from .io import IMAGE_SUFFIXES, ImageReadError, list_images, read_image, write_image
from .shifted import ShiftedDataset, SimulationReport, TileDataset, sample_seed, simulate
from .synthetic import random_stain_matrix, synthetic_he
from .samples import load_sample, load_sample_tiles, sample_path, sample_tiles_dir

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageReadError",
    "list_images",
    "read_image",
    "write_image",
    "load_sample",
    "load_sample_tiles",
    "sample_path",
    "sample_tiles_dir",
    "synthetic_he",
    "random_stain_matrix",
    "TileDataset",
    "ShiftedDataset",
    "SimulationReport",
    "simulate",
    "sample_seed",
]
