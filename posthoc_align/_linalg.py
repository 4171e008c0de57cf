"""Small dense linear-algebra conventions shared by the methods."""

from __future__ import annotations

import numpy as np

__all__ = ["flip_signs"]


def flip_signs(rows: np.ndarray) -> np.ndarray:
    """Make the largest-magnitude entry of every row positive (deterministic signs).

    Singular and eigenvectors are defined up to sign, and LAPACK, cuSOLVER and
    different chunkings may return either; this picks one, as scikit-learn's
    ``svd_flip`` does, so fitted axes do not depend on the device or the data path.

    Examples
    --------
    >>> flip_signs(np.array([[0.6, -0.8], [0.0, 0.0]])).tolist()
    [[-0.6, 0.8], [0.0, 0.0]]
    """
    if rows.size == 0:
        return rows
    big = np.argmax(np.abs(rows), axis=1)
    signs = np.sign(rows[np.arange(rows.shape[0]), big])
    signs[signs == 0] = 1.0
    return rows * signs[:, None]
