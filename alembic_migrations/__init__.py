"""Alembic revisions: the toolkit's own tables and each milestone's schema changes."""
