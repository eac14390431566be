"""Profiles: the profile-table format (``Metadata_*`` columns + features) and its transformations.

``table`` writes and reads profile tables (Parquet, CSV, AnnData) and aggregates image rows to
wells; ``columns`` maps a table's columns to the canonical metadata and normalises profiles
(per-plate standardisation, TVN); ``correction`` holds the post-hoc batch corrections
(sphering, Harmony, ComBat); ``arrays`` the small array helpers these and the metrics share.
Nothing here imports torch.
"""
