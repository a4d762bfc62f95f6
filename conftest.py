"""Shared pytest fixtures: real Redis, RabbitMQ and PostgreSQL, a real Celery worker.

The fixtures live in tests/fixtures/, one module per part; this file gathers
them so that every test directory sees the same set.
"""

pytest_plugins = [
    "tests.fixtures.services",
    "tests.fixtures.storage",
    "tests.fixtures.celery_worker",
    "tests.fixtures.receivers",
]
