"""Durable state: SQLAlchemy models, session factory, file store, Alembic migrations."""
