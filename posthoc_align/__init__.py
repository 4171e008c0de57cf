"""posthoc_align: post-hoc cross-lingual alignment of multilingual encoder states.

Estimators (scikit-learn style; ``languages=`` and ``pair_ids=`` are per-row metadata):

- :class:`LanguageMeanCentering` — subtract each language's mean (Libovický et al. 2020)
- :class:`LanguageStandardizer` — per-language z-scoring, fitted or in-batch (Zhao et al. 2021)
- :class:`ProcrustesAligner` — orthogonal map of each language into a pivot (Wang et al. 2019)
- :class:`PerLayer`, :class:`RotateAlign` — per-layer application (Kulshreshtha et al. 2020)
- :class:`LSAR` — low-rank language-subspace removal (Xie et al. 2022)

``load(path)`` reads an estimator written by ``est.save(path)``.
"""

from ._validation import ALL_ROWS
from ._version import __version__
from .centering import LanguageMeanCentering
from .lsar import LSAR
from .per_layer import PerLayer, RotateAlign
from .persistence import load
from .procrustes import ProcrustesAligner
from .standardization import LanguageStandardizer

__all__ = [
    "__version__",
    "ALL_ROWS",
    "LanguageMeanCentering",
    "LanguageStandardizer",
    "ProcrustesAligner",
    "PerLayer",
    "RotateAlign",
    "LSAR",
    "load",
]
