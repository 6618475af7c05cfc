"""Preference data: records, tokenized pairs, the epoch mixture, the online pool, the
DataModule, and the packaged samples (``data/samples``).

``PreferenceDataModule`` is exported lazily (PEP 562): the packaged samples are read by
modules the DataModule itself imports (the instructions task), which an eager import here
would make a cycle.
"""

__all__ = ["PreferenceDataModule"]


def __getattr__(name: str):
    if name == "PreferenceDataModule":
        from sail_lightning.data.datamodule import PreferenceDataModule

        return PreferenceDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
