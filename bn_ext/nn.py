"""bn_ext.nn, as torch.nn: the drop-in modules (bn_ext.modules) and the
conversion of a model's norm layers to them and back (bn_ext.conversion)."""

from bn_ext.conversion import ConvertReport, convert, revert
from bn_ext.modules import *  # noqa: F401,F403
from bn_ext.modules import __all__ as _modules

__all__ = [*_modules, "ConvertReport", "convert", "revert"]
