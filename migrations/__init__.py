"""Alembic migrations for the wattkeeper store; they run on SQLite and PostgreSQL alike."""
