"""An engine's metrics read as Prometheus reads them: by name, through its registry."""

from __future__ import annotations

from sluice_core.metrics import Metrics


def metric(metrics: Metrics, name: str, **labels: str) -> float:
    """The value of sample ``name`` (as /metrics shows it: ``sluice_events_ingested_total``)
    with ``labels``. A labelled series nothing has counted yet is 0, as in a scrape; a name
    the registry does not have is an error, not 0."""
    value = metrics.registry.get_sample_value(name, labels)
    if value is not None:
        return value
    families = {family.name for family in metrics.registry.collect()}
    if not any(name == family or name.startswith(family + "_") for family in families):
        raise KeyError(f"no metric {name!r} in the registry (has {sorted(families)})")
    return 0.0
