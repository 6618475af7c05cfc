from sail_lightning.data.datamodule import PreferenceDataModule

__all__ = ["PreferenceDataModule"]
