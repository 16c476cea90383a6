"""Data helpers: the embedded scikit-learn digits split and a top-1 accuracy evaluator."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from ._utils import model_device

__all__ = ["evaluate", "load_digits_split"]


def load_digits_split(
    *, seed: int = 0, test_fraction: float = 0.3
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Scikit-learn's 8x8 digits as normalised image tensors, split train/test.

    Pixels (0..16) are scaled to [0, 1], then standardised with the mean and standard
    deviation (two scalars) of the *training* split, so the test split sees no
    statistics of its own. The split is stratified by label and seeded.

    Parameters
    ----------
    seed : int, default=0
        Seed of the split; the same seed always gives the same tensors.
    test_fraction : float, default=0.3
        Fraction of the 1797 images held out for testing, in (0, 1).

    Returns
    -------
    x_train : Tensor of shape (n_train, 1, 8, 8), float32
    y_train : Tensor of shape (n_train,), int64
    x_test : Tensor of shape (n_test, 1, 8, 8), float32
    y_test : Tensor of shape (n_test,), int64

    Examples
    --------
    >>> from recon.data import load_digits_split
    >>> x_train, y_train, x_test, y_test = load_digits_split(seed=0)
    >>> tuple(x_train.shape), tuple(x_test.shape)
    ((1257, 1, 8, 8), (540, 1, 8, 8))
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(
            f"The 'seed' parameter of load_digits_split must be an int. Got {seed!r} instead."
        )
    if (
        isinstance(test_fraction, bool)
        or not isinstance(test_fraction, (int, float))
        or not 0 < test_fraction < 1
    ):
        raise ValueError(
            f"The 'test_fraction' parameter of load_digits_split must be a float in (0, 1). "
            f"Got {test_fraction!r} instead."
        )
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32) / np.float32(16.0)  # (N, 8, 8) in [0, 1]
    labels = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=test_fraction, random_state=int(seed), stratify=labels
    )
    mean = x_tr.mean(dtype=np.float64)
    std = x_tr.std(dtype=np.float64)

    def to_tensor(x: np.ndarray) -> Tensor:
        x = ((x - mean) / std).astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(x)).unsqueeze(1)  # (N, 1, 8, 8)

    return (
        to_tensor(x_tr),
        torch.from_numpy(np.ascontiguousarray(y_tr)),
        to_tensor(x_te),
        torch.from_numpy(np.ascontiguousarray(y_te)),
    )


def evaluate(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``.

    The model is put in eval mode under ``torch.inference_mode()`` and the previous
    train/eval mode of each of its submodules is restored afterwards. Batches are
    moved to the model's device.

    Parameters
    ----------
    model : nn.Module
        Classifier returning logits of shape (batch, num_classes).
    x : Tensor of shape (N, ...)
        Inputs.
    y : Tensor of shape (N,)
        Integer class labels.
    batch_size : int, default=256
        Images per forward pass.

    Returns
    -------
    float
        Fraction of correctly classified samples, in [0, 1].
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"The 'model' parameter of evaluate must be an nn.Module. "
            f"Got {type(model).__name__} instead."
        )
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(
            f"The 'x' and 'y' parameters of evaluate must be Tensors. "
            f"Got {type(x).__name__} and {type(y).__name__} instead."
        )
    if y.ndim != 1 or len(x) != len(y):
        raise ValueError(
            f"The 'y' parameter of evaluate must have shape (N,) with N = len(x) = {len(x)}. "
            f"Got shape {tuple(y.shape)} instead."
        )
    if len(y) == 0:
        raise ValueError("The 'x' parameter of evaluate must hold at least one sample. Got 0.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(
            f"The 'batch_size' parameter of evaluate must be an int >= 1. "
            f"Got {batch_size!r} instead."
        )
    device = model_device(model)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    correct = 0
    try:
        with torch.inference_mode():
            for start in range(0, len(x), batch_size):
                xb = x[start : start + batch_size].to(device)
                yb = y[start : start + batch_size].to(device)
                pred = model(xb).argmax(dim=1)  # (B,)
                correct += int((pred == yb).sum())
    finally:
        for m, training in modes:
            m.training = training
    return correct / len(y)
