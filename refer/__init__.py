"""The REFER API for referring-expression datasets (RefCOCO, RefCOCO+, RefCOCOg, RefCLEF, synthetic)."""

from .refer import DATASETS, REFER, SPLITS, ReferDataError, ReferFileNotFoundError, ReferKeyError

__all__ = ["DATASETS", "REFER", "SPLITS", "ReferDataError", "ReferFileNotFoundError", "ReferKeyError"]
