"""Comparing two pruned models computed in a different order (for tests).

Floating-point sums depend on their order, and so does everything recon fits from
them. Two runs that differ only in how the work was split -- one process or two
(statistics all-reduced), other calibration batch sizes (other Gram blocks), other
thread counts, another SIMD width (``ATEN_CPU_CAPABILITY``), another BLAS -- give
models that are the same as far as any user can tell, but not bit for bit. Bit-exact
comparisons belong only where recon promises them: ranks of one run against each
other, the same call repeated in one process, the activation cache on or off.

Elsewhere compare what users see, in relative terms:

* **outputs** on held-out images, ``‖a − b‖ / ‖b‖ <= OUTPUT_RTOL``;
* **weights** per tensor, ``‖a − b‖ / ‖b‖ <= WEIGHT_RTOL``. Each re-fit is a
  least-squares solve whose Gram (with its intercept row) has a condition number of
  1e3 to 1e8 in these small random networks; it amplifies the ~1e-7 relative
  differences of float32 activations, and each layer's re-fit feeds the next. A few
  entries move most, so no entry-wise tolerance holds: on one machine an
  ``ATEN_CPU_CAPABILITY=default`` run moved one VGG-11/8 weight by 2.9e-4 (its tensor
  by 4.7e-5 relative) while the outputs moved by 2.8e-6;
* **relative squared errors** ``e = ‖out − ref‖² / ‖ref‖²`` through ``sqrt(e)``, which
  moves by at most the outputs' relative difference (triangle inequality), while ``e``
  itself, when small, moves by far more relative to its size.

The tolerances sit 20 to 40 times above the largest difference measured across
thread counts and ISAs, and far below what a real change makes: pruning the same
VGG-11/8 with one calibration image of 160 left out moves its outputs by 6e-3 and
some weight tensors by 100 %.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

#: ``‖a − b‖ / ‖b‖`` allowed between the outputs of two runs on held-out images.
OUTPUT_RTOL = 1e-4
#: ``‖a − b‖ / ‖b‖`` allowed between two runs' weight tensors (see the module docstring).
WEIGHT_RTOL = 1e-3


def relative_difference(got: Tensor, want: Tensor) -> float:
    """``‖got − want‖ / ‖want‖`` in float64 (the plain norm when ``want`` is zero)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    diff = float((got - want).norm())
    scale = float(want.norm())
    return diff / scale if scale > 0 else diff


def assert_same_outputs(
    got: Tensor, want: Tensor, rtol: float = OUTPUT_RTOL, msg: str = ""
) -> None:
    """Two runs' outputs on the same (held-out) inputs agree to ``rtol`` relative."""
    assert got.shape == want.shape, f"{msg} shapes {tuple(got.shape)} != {tuple(want.shape)}"
    rel = relative_difference(got, want)
    assert rel <= rtol, f"{msg} outputs differ by {rel:.2e} relative (up to {rtol:.0e} allowed)"


def assert_same_state(
    got: Mapping[str, Tensor], want: Mapping[str, Tensor], rtol: float = WEIGHT_RTOL
) -> None:
    """Same keys and shapes, integer buffers equal, float tensors within ``rtol`` relative."""
    assert list(got) == list(want)
    for name, ref in want.items():
        value = got[name]
        assert value.shape == ref.shape, name
        if not ref.is_floating_point():
            assert torch.equal(value, ref), name
            continue
        rel = relative_difference(value, ref)
        assert rel <= rtol, f"{name} differs by {rel:.2e} relative (up to {rtol:.0e} allowed)"


def assert_same_error(got: float, want: float, atol: float = OUTPUT_RTOL, msg: str = "") -> None:
    """Two relative squared errors agree: their square roots to ``atol``."""
    a, b = math.sqrt(got), math.sqrt(want)
    assert abs(a - b) <= atol, f"{msg} sqrt(error) {a:.6g} != {b:.6g} (up to {atol:.0e} allowed)"
