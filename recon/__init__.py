"""recon: reconstruction-based channel pruning for CNNs.

>>> import recon
>>> result = recon.prune(model, calib_images, speedup=2.0)      # doctest: +SKIP
>>> print(result.report)                                         # doctest: +SKIP
>>> recon.save(result, "pruned.pt")                              # doctest: +SKIP
>>> model = recon.load("pruned.pt", build_unpruned_model)       # doctest: +SKIP
>>> scratch = recon.reinit(result.model, seed=0)                 # doctest: +SKIP

The public submodules are attributes too, imported on first use (PEP 562), so that
``import recon`` loads only what :func:`prune` needs:

>>> recon.models.pretrained("vgg16_fmnist")                     # doctest: +SKIP
>>> recon.plans.names()                                         # doctest: +SKIP
"""

import importlib as _importlib
import pkgutil as _pkgutil
from functools import cache as _cache
from types import ModuleType as _ModuleType

from ._plan import apply_plan
from ._version import __version__
from .api import PruneResult, prune
from .io import load, save
from .recovery import RecoverResult, recover
from .report import LayerReport, RecoverReport, Report
from .scratch import reinit

# (IterativeResult, ScanResult, iterative_prune, sensitivity_scan: imported on first
# use, see _LAZY: they load fine-tuning)
__all__ = [
    "IterativeResult",
    "LayerReport",
    "PruneResult",
    "RecoverReport",
    "RecoverResult",
    "Report",
    "ScanResult",
    "__version__",
    "apply_plan",
    "iterative_prune",
    "load",
    "prune",
    "recover",
    "reinit",
    "save",
    "sensitivity_scan",
]

#: Public names served from a submodule on first use, so that ``import recon`` stays light.
_LAZY = {
    "IterativeResult": "iterative",
    "iterative_prune": "iterative",
    "ScanResult": "scan",
    "sensitivity_scan": "scan",
}


@_cache
def _submodules() -> frozenset[str]:
    """The public submodules: every module of the package not named with a leading _."""
    return frozenset(m.name for m in _pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def __getattr__(name: str) -> _ModuleType | object:
    # Only called for names not found the usual way: a submodule not imported yet,
    # or a name of _LAZY.
    if name in _LAZY:
        return getattr(_importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    if name in _submodules():
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _submodules() | set(_LAZY))
