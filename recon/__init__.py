"""recon: reconstruction-based channel pruning for CNNs.

>>> import recon
>>> result = recon.prune(model, calib_images, speedup=2.0)      # doctest: +SKIP
>>> print(result.report)                                         # doctest: +SKIP
>>> recon.save(result, "pruned.pt")                              # doctest: +SKIP
>>> model = recon.load("pruned.pt", build_unpruned_model)       # doctest: +SKIP
"""

from ._plan import apply_plan
from ._version import __version__
from .api import PruneResult, prune
from .io import load, save
from .report import LayerReport, Report

__all__ = [
    "LayerReport",
    "PruneResult",
    "Report",
    "__version__",
    "apply_plan",
    "load",
    "prune",
    "save",
]
