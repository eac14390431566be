"""What each headline metric means, which way is better and what chance or no batch signal gives.

One table, keyed by the metric's path inside a feature set's results (``results.json``), so the
evaluation report, the demo, the comparison and the study all describe a metric the same way.
Definitions and reference implementations are in ``docs/metrics.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

BATCH = "batch removal"
BIO = "biology conservation"


@dataclass(frozen=True)
class MetricInfo:
    """One metric's group, better direction, chance/null value and one-line meaning."""

    group: str  # BATCH, BIO, or "" (not scored in the figure)
    higher_is_better: bool
    null: str  # what chance, or profiles without batch signal, would score
    meaning: str


_PROBE_NULL = "1 / number of treatments"
_MAP_NULL = "about the share of positives (random ranking)"
_SIG_NULL = "about 0.05"

METRIC_INFO: dict[tuple[str, ...], MetricInfo] = {
    ("online_probe", "accuracy"): MetricInfo(
        BIO, True, _PROBE_NULL, "the probe trained alongside the network, on held-out images"
    ),
    ("online_probe", "macro_f1"): MetricInfo(
        BIO, True, _PROBE_NULL, "macro F1 of the probe trained alongside the network"
    ),
    ("classification", "logistic", "accuracy"): MetricInfo(
        BIO, True, _PROBE_NULL, "logistic probe fitted on training batches predicts the treatment"
    ),
    ("classification", "logistic", "macro_f1"): MetricInfo(
        BIO, True, _PROBE_NULL, "macro F1 of the logistic treatment probe"
    ),
    ("classification", "knn", "accuracy"): MetricInfo(
        BIO, True, _PROBE_NULL, "weighted 10-nearest-neighbour vote of the training wells"
    ),
    ("classification", "knn", "macro_f1"): MetricInfo(
        BIO, True, _PROBE_NULL, "macro F1 of the kNN treatment vote"
    ),
    ("moa_matching", "nsc"): MetricInfo(
        BIO, True, "about 1 / number of MoAs", "nearest other compound shares the MoA"
    ),
    ("moa_matching", "nscb"): MetricInfo(
        BIO, True, "about 1 / number of MoAs", "as NSC, the match from another batch"
    ),
    ("kbet", "acceptance_rate"): MetricInfo(
        BATCH,
        True,
        "about 0.95 with no batch signal; 0 when batches separate",
        "share of neighbourhoods whose batch mix matches the whole (χ² test)",
    ),  # fmt: skip
    ("kbet", "per_treatment_mean"): MetricInfo(
        BATCH, True, "design-dependent (cdcl evaluate --calibrate)", "kBET within each treatment"
    ),
    ("mixing_per_treatment", "kbet"): MetricInfo(
        BATCH, True, "design-dependent (cdcl evaluate --calibrate)", "kBET within each treatment"
    ),
    ("ilisi", "ilisi"): MetricInfo(
        BATCH,
        True,
        "about 1 with ideal mixing; 0 when batches separate",
        "scaled inverse Simpson index of batch labels among neighbours",
    ),  # fmt: skip
    ("mixing_per_treatment", "ilisi"): MetricInfo(
        BATCH, True, "design-dependent (cdcl evaluate --calibrate)", "iLISI within each treatment"
    ),
    ("mixing_per_treatment", "batch_silhouette"): MetricInfo(
        BATCH, True, "near 1 with no batch structure", "1 − |batch silhouette| per treatment"
    ),
    ("mixing_per_treatment", "graph_connectivity"): MetricInfo(
        BATCH,
        True,
        "design-dependent (cdcl evaluate --calibrate)",
        "share of a treatment's rows in one connected kNN component",
    ),  # fmt: skip
    ("silhouette", "batch_scib"): MetricInfo(
        BATCH, True, "near 1 with no batch structure", "1 − |batch silhouette|, all rows (scib)"
    ),
    ("silhouette", "treatment"): MetricInfo(
        BIO, True, "0", "silhouette width of the treatment labels (cosine)"
    ),
    ("silhouette", "moa"): MetricInfo(BIO, True, "0", "silhouette width of the MoA labels"),
    ("grit", "mean_grit"): MetricInfo(
        BIO, True, "0", "replicate similarity in units of control variation"
    ),
    ("map", "replicate", "map"): MetricInfo(
        BIO, True, _MAP_NULL, "a well retrieves its replicates ahead of controls"
    ),
    ("map", "replicate", "fraction_significant"): MetricInfo(
        BIO, True, _SIG_NULL, "share of treatments whose replicate mAP beats the null"
    ),
    ("map", "replicate_batch_aware", "map"): MetricInfo(
        BIO, True, _MAP_NULL, "replicate mAP counting only replicates from other batches"
    ),
    ("map", "replicate_batch_aware", "fraction_significant"): MetricInfo(
        BIO, True, _SIG_NULL, "share significant, replicates from other batches"
    ),
    ("map", "moa", "map"): MetricInfo(
        BIO, True, _MAP_NULL, "a treatment retrieves other compounds of its MoA"
    ),
    ("map", "moa", "fraction_significant"): MetricInfo(
        BIO, True, _SIG_NULL, "share of treatments whose MoA mAP beats the null"
    ),
    ("map", "moa_batch_aware", "map"): MetricInfo(
        BIO, True, _MAP_NULL, "MoA mAP counting only matches from other batches"
    ),
    ("map", "moa_batch_aware", "fraction_significant"): MetricInfo(
        BIO, True, _SIG_NULL, "share significant, MoA matches from other batches"
    ),
    ("batch_classifier", "accuracy"): MetricInfo(
        BATCH,
        False,
        "the largest batch's share (the chance row)",
        "cross-validated logistic regression predicting the batch",
    ),  # fmt: skip
    ("batch_classifier", "chance"): MetricInfo(
        "", False, "–", "the batch classifier's chance level: the largest batch's share"
    ),
    ("batch_endpoints", "retrieval_penalty", "mean"): MetricInfo(
        BATCH,
        False,
        "0 with no batch effect (design-dependent spread: cdcl evaluate --calibrate)",
        "replicate AP from the own batch minus from other batches, positives matched in number",
    ),  # fmt: skip
    ("control_mixing", "kbet"): MetricInfo(
        BATCH, True, "about 0.95 with no batch signal", "kBET of the control wells alone"
    ),
    ("control_mixing", "ilisi"): MetricInfo(
        BATCH, True, "about 1 with ideal mixing", "scaled iLISI of the control wells alone"
    ),
    ("control_mixing", "batch_classifier", "accuracy"): MetricInfo(
        BATCH,
        False,
        "its chance on the same folds (stored as chance)",
        "batch of a control well predicted by a classifier trained on other plates",
    ),  # fmt: skip
    ("aggregate", "score"): MetricInfo(
        "", True, "–", "0.4 × mean of batch metrics + 0.6 × mean of biology metrics (scib)"
    ),
}


def info_for(path: tuple[str, ...]) -> MetricInfo | None:
    """The description of the metric stored at ``path`` (None when unknown)."""
    return METRIC_INFO.get(tuple(path))
