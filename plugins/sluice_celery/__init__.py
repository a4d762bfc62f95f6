"""Celery support for Sluice: the event normalizer and the Redis event source.

Sluice never imports Celery: :mod:`sluice_celery.events` decodes Celery's event
messages itself (see docs/celery-protocol.md), :mod:`sluice_celery.redis_source`
reads them from Redis pub/sub, and :mod:`sluice_celery.plugin` registers both
through Sluice's hooks (entry point ``celery`` of group ``sluice``).
"""
