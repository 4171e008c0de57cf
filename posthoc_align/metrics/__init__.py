"""Cross-lingual alignment metrics on hidden states.

Every metric takes the stacked rows ``X`` of all languages with one language
label per row (``languages``) and, where translations matter, one ``pair_id`` per
row (rows sharing a ``pair_id`` are translations). Searches over the other
language run block-wise under a ``memory_budget`` (bytes): no n×n matrix.

* :func:`retrieval_accuracy` — P@1 with cosine, dot or CSLS scoring.
* :func:`alignment_scores` — weak / strong alignment, mean and normalised cosine.
* :func:`bitext_mining_f1` — BUCC-style mining with the ratio margin.
* :func:`language_id_accuracy`, :func:`transfer_gap` — linear probes.
* :func:`eigenvector_similarity`, :func:`relational_similarity` — isomorphism.
* :func:`hubness` — k-occurrence skewness.
* :func:`evaluate_pairs`, :func:`to_markdown`, :func:`to_csv` — tidy tables of
  every metric above for many language pairs at once (:data:`METRICS` names them;
  the probes run on the rows of each pair's two languages: ``language_id``,
  ``language_id_majority``, and with task labels ``y=`` ``transfer_gap``,
  ``transfer_target_score``, ``transfer_source_score``).
"""

from ._similarity import NoPairsError
from .alignment import alignment_scores
from .hubness import hubness
from .isomorphism import eigenvector_similarity, relational_similarity
from .mining import bitext_mining_f1
from .probes import language_id_accuracy, transfer_gap
from .retrieval import retrieval_accuracy
from .table import DEFAULT_METRICS, METRICS, evaluate_pairs, to_csv, to_markdown

__all__ = [
    "DEFAULT_METRICS",
    "METRICS",
    "NoPairsError",
    "alignment_scores",
    "bitext_mining_f1",
    "eigenvector_similarity",
    "evaluate_pairs",
    "hubness",
    "language_id_accuracy",
    "relational_similarity",
    "retrieval_accuracy",
    "to_csv",
    "to_markdown",
    "transfer_gap",
]
