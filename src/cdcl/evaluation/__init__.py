"""The evaluation step: embed a run's held-out images or read a profile table, score every
feature set, write results.json and the report (``run``, ``table_file``), and the calibration
of the metrics on the evaluated design (``calibration``)."""
