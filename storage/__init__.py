"""Sluice's storage backends: SQLite (the embedded default) and PostgreSQL.

Installed as ``sluice_storage``. Each backend module is a plugin implementing the
``sluice_storage`` hook; :mod:`sluice_storage.common` holds what they share (row
mapping, the per-batch fold, migrations, list queries).
"""
