"""Data: built-in toy distributions and digits, user files, and the batch loader."""

from scaler.data.config import DATA_SOURCES, data_config
from scaler.data.global_batch import to_global
from scaler.data.loader import BatchLoader
from scaler.data.source import SOURCES, DataSpec, Source, fingerprint, load_source, load_spec

__all__ = ["DATA_SOURCES", "data_config", "to_global", "BatchLoader", "SOURCES", "DataSpec", "Source",
           "fingerprint", "load_source", "load_spec"]
