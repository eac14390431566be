"""Embedding: images to features, with a run's backbone, a baseline or CellProfiler measurements.

``inference`` runs a backbone over a dataset's images; ``sources`` resolves what to embed with;
``job`` and ``to_file`` make an embedding resumable and write it as a profile table;
``cellprofiler_features`` and ``cellprofiler`` measure CellProfiler-style features per cell and
aggregate them to well profiles. Import the submodules directly.
"""
