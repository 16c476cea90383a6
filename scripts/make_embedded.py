"""Write recon/assets/fmnist_subset.npz: the embedded Fashion-MNIST subset.

A fixed, seeded, class-balanced subset of the Fashion-MNIST *test* split: 1,000
calibration images (100 per class) and 2,000 evaluation images (200 per class),
disjoint. For each class, the test images of that class are permuted by a seeded
generator; the first 100 go to calibration, the next 200 to evaluation; each set is
then shuffled (seeded), so that any prefix of it is roughly balanced.

The file holds uint8 images and labels and the images' positions in the test split:

    x_calib (1000, 28, 28) uint8   y_calib (1000,) uint8   idx_calib (1000,) uint16
    x_eval  (2000, 28, 28) uint8   y_eval  (2000,) uint8   idx_eval  (2000,) uint16

It is written like ``np.savez_compressed`` but with fixed zip timestamps, so that the
same data always give the same bytes. Read it with :func:`recon.data.load_embedded`.

    python scripts/make_embedded.py                       # Debian package or cache
    python scripts/make_embedded.py --data-dir ~/fashion  # a folder with the IDX files
"""

from __future__ import annotations

import argparse
import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np

from recon.data import load_fashion_mnist

OUT = Path(__file__).resolve().parents[1] / "recon" / "assets" / "fmnist_subset.npz"


def select(
    labels: np.ndarray, *, n_calib: int, n_eval: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint, class-balanced, seeded index sets ``(idx_calib, idx_eval)`` into ``labels``.

    Parameters
    ----------
    labels : ndarray of shape (N,)
        Class labels in 0..9.
    n_calib, n_eval : int
        Sizes of the two sets; multiples of the number of classes.
    seed : int
        Seed of ``np.random.default_rng``.

    Returns
    -------
    idx_calib : ndarray of shape (n_calib,), int64
    idx_eval : ndarray of shape (n_eval,), int64
    """
    classes = np.unique(labels)
    k = len(classes)
    if n_calib % k or n_eval % k:
        raise ValueError(f"n_calib and n_eval must be multiples of {k} classes.")
    rng = np.random.default_rng(seed)
    calib, evals = [], []
    for c in classes:
        members = rng.permutation(np.flatnonzero(labels == c))
        if len(members) < (n_calib + n_eval) // k:
            raise ValueError(f"class {c} has only {len(members)} images")
        calib.append(members[: n_calib // k])
        evals.append(members[n_calib // k : (n_calib + n_eval) // k])
    return rng.permutation(np.concatenate(calib)), rng.permutation(np.concatenate(evals))


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez_compressed`` with fixed timestamps (byte-reproducible), written atomically."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
            zf.writestr(info, member.getvalue(), compresslevel=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(path)


def main(argv: list[str] | None = None) -> None:
    """Build the subset from the test split and write it (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, help="folder with the Fashion-MNIST IDX files")
    parser.add_argument("--download", action="store_true", help="download into the cache")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--n-calib", type=int, default=1000)
    parser.add_argument("--n-eval", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    images, labels = load_fashion_mnist("test", data_dir=args.data_dir, download=args.download)
    idx_calib, idx_eval = select(labels, n_calib=args.n_calib, n_eval=args.n_eval, seed=args.seed)
    assert not np.intersect1d(idx_calib, idx_eval).size
    save_npz(
        args.out,
        {
            "x_calib": images[idx_calib],
            "y_calib": labels[idx_calib].astype(np.uint8),
            "idx_calib": idx_calib.astype(np.uint16),
            "x_eval": images[idx_eval],
            "y_eval": labels[idx_eval].astype(np.uint8),
            "idx_eval": idx_eval.astype(np.uint16),
        },
    )
    data = args.out.read_bytes()
    print(
        f"{args.out}: {len(idx_calib)} calibration + {len(idx_eval)} evaluation images, "
        f"{len(data) / 1e6:.2f} MB, sha256 {hashlib.sha256(data).hexdigest()}"
    )


if __name__ == "__main__":
    main()
