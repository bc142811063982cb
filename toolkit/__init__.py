"""toolkit: carries out GitLab's "Merge Model experiments into Model registry" blueprint."""

__version__ = "0.1.0"
