"""An engine's metrics read as Prometheus reads them: by name, through its registry."""

from __future__ import annotations

from sluice_core.metrics import Metrics


def metric(metrics: Metrics, name: str, **labels: str) -> float:
    """The value of sample ``name`` (as /metrics shows it: ``sluice_events_ingested_total``)
    summed over its series that have ``labels``, as PromQL's ``sum(name{labels})``: a
    series with more labels than asked for counts too. A labelled series nothing has
    counted yet is 0, as in a scrape; a name the registry does not have is an error, not 0."""
    families = list(metrics.registry.collect())
    if not any(name == f.name or name.startswith(f.name + "_") for f in families):
        names = sorted(f.name for f in families)
        raise KeyError(f"no metric {name!r} in the registry (has {names})")
    return sum(
        sample.value
        for family in families
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )
