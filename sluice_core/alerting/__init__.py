"""Alerting: rules over jobs, queues and workers; incidents; notifications on channels.

- :mod:`sluice_core.alerting.model`: the vocabulary (Rule, Channel, Incident, Message,
  ChannelType, AlertService);
- the evaluator runs on the leader (one per deployment), the outbox delivers.
"""
