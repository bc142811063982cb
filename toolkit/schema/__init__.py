"""Table definitions: GitLab's ML tables (gitlab.py) and the toolkit's own (own.py)."""
