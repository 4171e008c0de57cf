"""posthoc_align: post-hoc cross-lingual alignment of multilingual encoder states.

Estimators (scikit-learn style; ``languages=`` and ``pair_ids=`` are per-row metadata):

- :class:`LanguageMeanCentering` — subtract each language's mean (Libovický et al. 2020)
- :class:`LanguageStandardizer` — per-language z-scoring, fitted or in-batch (Zhao et al. 2021)
- :class:`ProcrustesAligner` — orthogonal map of each language into a pivot (Wang et al. 2019)
- :class:`PerLayer`, :class:`RotateAlign` — per-layer application (Kulshreshtha et al. 2020)
- :class:`LSAR` — low-rank language-subspace removal (Xie et al. 2022)
- :class:`LanguageEraser` — LEACE with the language as the concept (Belrose et al. 2023)
- :class:`LanguageAxes` — language-sensitive / neutral axes (Chang et al. 2022)
- :class:`GeneralizedProcrustes` — pivot-free alignment to a consensus (Gower 1975)

``load(path)`` reads an estimator written by ``est.save(path)``.
"""

from ._validation import ALL_ROWS
from ._version import __version__
from .axes import LanguageAxes
from .centering import LanguageMeanCentering
from .erasure import LanguageEraser
from .generalized_procrustes import GeneralizedProcrustes
from .lsar import LSAR
from .per_layer import PerLayer, RotateAlign
from .persistence import load
from .procrustes import ProcrustesAligner
from .profile import alignment_profile
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
    "LanguageEraser",
    "LanguageAxes",
    "GeneralizedProcrustes",
    "load",
    "alignment_profile",
]
