"""Training presets (YAML files, found by name) and the sizing of the ``generic-*`` family."""
