"""Alembic revision scripts of the run catalog (a package so that wheels include them)."""
