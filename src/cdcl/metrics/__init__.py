"""Evaluation metrics for batch-robust profiles of high-content screens (docs/design.md §7).

Pure functions on ``features`` (float32, shape (n, d)) and aligned metadata (arrays, pandas
Series or a DataFrame with one row per feature row); no file I/O. Everything that compares all
points with all points runs in blocks (:mod:`.neighbours`): no n x n matrix is ever built.

One module per family, each naming its definitions and references:

- :mod:`.neighbours`: blocked exact kNN search; weighted kNN treatment accuracy (Wu et al.,
  CVPR 2018; DINO's ``eval_knn``, Caron et al., ICCV 2021);
- :mod:`.classification`: label prediction scores, logistic probe, batch classifier;
- :mod:`.mixing`: kBET (Buttner et al., Nat Methods 2019), silhouettes (Rousseeuw 1987), iLISI
  (Korsunsky et al., Nat Methods 2019) and graph connectivity (scib), also per treatment;
- retrieval: :mod:`.matching` (NSC/NSCB, Ljosa et al., J Biomol Screen 2013), :mod:`.reproducibility`
  (Way et al., Cell Systems 2022) and :mod:`.retrieval` (mAP with copairs conventions,
  Kalinin et al., Nat Commun 2025).
"""

from cdcl.metrics.classification import (
    batch_classifier_accuracy,
    classification_scores,
    logistic_probe_accuracy,
)
from cdcl.metrics.matching import nsc_nscb, treatment_profiles
from cdcl.metrics.mixing import (
    batch_silhouette_global,
    batch_silhouette_score,
    graph_connectivity,
    ilisi,
    kbet,
    kbet_per_group,
    lisi_values,
    mixing_per_treatment,
    scib_aggregate,
    silhouette,
)
from cdcl.metrics.neighbours import (
    NeighborGraph,
    knn_indices,
    neighbor_graph,
    weighted_knn_accuracy,
)
from cdcl.metrics.reproducibility import grit, grit_summary
from cdcl.metrics.retrieval import (
    average_precision,
    average_precisions,
    map_pvalues,
    mean_average_precision,
    mean_average_precisions,
    moa_map,
    moa_maps,
    replicate_map,
    replicate_maps,
    unit_rows_copy,
)

__all__ = [
    "NeighborGraph",
    "average_precision",
    "average_precisions",
    "batch_classifier_accuracy",
    "batch_silhouette_global",
    "batch_silhouette_score",
    "classification_scores",
    "grit",
    "graph_connectivity",
    "grit_summary",
    "ilisi",
    "kbet",
    "kbet_per_group",
    "knn_indices",
    "lisi_values",
    "logistic_probe_accuracy",
    "map_pvalues",
    "mean_average_precision",
    "mean_average_precisions",
    "mixing_per_treatment",
    "moa_map",
    "moa_maps",
    "neighbor_graph",
    "nsc_nscb",
    "replicate_map",
    "replicate_maps",
    "unit_rows_copy",
    "scib_aggregate",
    "silhouette",
    "treatment_profiles",
    "weighted_knn_accuracy",
]
