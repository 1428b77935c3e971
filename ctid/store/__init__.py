"""ctid's storage: SQLAlchemy 2 async over SQLite (embedded default) or PostgreSQL.

Modules, one role each:

- ``db``: :func:`~ctid.store.db.create_engine` (per-dialect connection
  settings: SQLite pragmas, PostgreSQL pool), :class:`~ctid.store.db.Database`
  (owns the engine and session factory; ``start()`` migrates to head,
  ``ping()`` backs ``/healthz``, ``close()``), :func:`~ctid.store.db.upgrade`
  for the CLI, and :class:`~ctid.store.db.StoreError`.
- ``types``: :class:`~ctid.store.types.UTCDateTime`, aware UTC timestamps on
  both dialects.
- ``models``: the declarative schema (``calls``, ``call_legs``,
  ``event_outbox``, ``meta``).
- ``calls``: :class:`~ctid.store.calls.CallRecord` / ``LegRecord`` (plain
  dataclasses produced by the pure call model) and the
  :class:`~ctid.store.calls.CallStore` repository.
- ``migrations/``: Alembic revisions, run from code; no ``alembic.ini`` needed.

Nothing outside this package imports SQLAlchemy: other domains talk to the
database through repositories like ``CallStore`` and plain records.

This module deliberately imports nothing, so ``import ctid.store.calls`` stays
cheap and has no side effects.
"""
