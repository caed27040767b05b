"""Configuration: ``params.yaml`` (strict), the run knobs, ``--set`` overrides, data recipes as transforms."""
