"""Data: the Shapes world generator, webdataset streaming and the DataModules every stage uses.

The DataModules are importable from here (``class_path: lit_star.data.ImageTextDataModule``); they
are loaded on first access so that importing a lightweight submodule does not pull in Lightning.
"""

from importlib import import_module

_LAZY_EXPORTS = {
    "ShardDataModule": "lit_star.data.datamodules",
    "ImageTextDataModule": "lit_star.data.datamodules",
    "VQADataModule": "lit_star.data.datamodules",
    "EditDataModule": "lit_star.data.datamodules",
    "KnowledgeDataModule": "lit_star.data.datamodules",
    "MixtureDataModule": "lit_star.data.datamodules",
    "DataHealthMonitor": "lit_star.data.health",
    "DataHealthError": "lit_star.data.health",
    "strip_data_health": "lit_star.data.health",
}

__all__ = sorted(_LAZY_EXPORTS)


def __getattr__(name: str):
    if name in _LAZY_EXPORTS:
        return getattr(import_module(_LAZY_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
