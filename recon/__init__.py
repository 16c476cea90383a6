"""recon: reconstruction-based channel pruning for CNNs.

>>> import recon
>>> result = recon.prune(model, calib_images, speedup=2.0)      # doctest: +SKIP
>>> print(result.report)                                         # doctest: +SKIP
"""

from ._version import __version__
from .api import PruneResult, prune
from .report import LayerReport, Report

__all__ = ["LayerReport", "PruneResult", "Report", "__version__", "prune"]
