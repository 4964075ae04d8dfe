"""Data: built-in toy distributions and digits, user files streamed from disk (.npy,
.npz, image folders, ArrayRecord), and the step-keyed batch loader."""

from scaler.data.config import DATA_SOURCES, data_config
from scaler.data.global_batch import to_global
from scaler.data.loader import BatchLoader
from scaler.data.source import SOURCES, Source, fingerprint, load_source, load_spec
from scaler.data.spec import DataSpec, read_spec, save_spec

__all__ = ["DATA_SOURCES", "data_config", "to_global", "BatchLoader", "SOURCES", "DataSpec",
           "Source", "fingerprint", "load_source", "load_spec", "read_spec", "save_spec"]
