"""Small SVG charts drawn on the server, so pages need no charting library.

Every chart is plain SVG markup: colours come from the stylesheet (classes
``series-N``), nothing uses inline styles or scripts, so a strict
Content-Security-Policy holds. Axis times carry ``data-ts`` (epoch seconds)
and are written in UTC; sluice.js rewrites them in the viewer's timezone.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Sequence

import attrs
from markupsafe import Markup, escape

Point = tuple[float, float]  # (epoch seconds, value)


@attrs.frozen
class Series:
    label: str
    points: Sequence[Point]
    css_class: str = "series-0"


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^k at or above ``value``: round axis maxima."""
    if value <= 0:
        return 1.0
    magnitude = 10.0 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * magnitude:
            return step * magnitude
    return 10 * magnitude


def _hhmm(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%H:%M")


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if value >= 10 or value == int(value) else f"{value:.1f}"


def line_chart(
    series: Sequence[Series],
    *,
    since: float,
    until: float,
    title: str,
    width: int = 640,
    height: int = 200,
    y_format: Callable[[float], str] = _fmt,
    y_max: float | None = None,
) -> Markup:
    """A line chart of one or more series over ``[since, until]``, with axes and a legend."""
    left, right, top, bottom = 48, 12, 12, 24
    plot_w, plot_h = width - left - right, height - top - bottom
    span = max(until - since, 1e-9)
    values = [v for s in series for _, v in s.points]
    top_value = y_max if y_max is not None else nice_ceiling(max(values, default=0.0))

    def x(ts: float) -> float:
        return left + (min(max(ts, since), until) - since) / span * plot_w

    def y(value: float) -> float:
        return top + plot_h - min(value, top_value) / top_value * plot_h

    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{escape(title)}"><title>{escape(title)}</title>'
    ]
    for fraction in (0.0, 0.5, 1.0):
        gy = y(top_value * fraction)
        parts.append(
            f'<line class="grid" x1="{left}" x2="{width - right}" y1="{gy:.1f}" y2="{gy:.1f}"/>'
            f'<text class="axis" x="{left - 6}" y="{gy + 4:.1f}" text-anchor="end">'
            f"{escape(y_format(top_value * fraction))}</text>"
        )
    for fraction, anchor in ((0.0, "start"), (0.5, "middle"), (1.0, "end")):
        ts = since + span * fraction
        parts.append(
            f'<text class="axis" x="{x(ts):.1f}" y="{height - 6}" text-anchor="{anchor}" '
            f'data-ts="{ts:.0f}">{_hhmm(ts)}</text>'
        )
    if not values:
        parts.append(
            f'<text class="empty" x="{left + plot_w / 2:.1f}" y="{top + plot_h / 2:.1f}" '
            f'text-anchor="middle">No data in this period</text>'
        )
    for s in series:
        coords = " ".join(f"{x(ts):.1f},{y(v):.1f}" for ts, v in s.points)
        if not coords:
            continue
        cls = escape(s.css_class)
        if len(s.points) > 1:
            (x0, _), (x1, _) = s.points[0], s.points[-1]
            base = y(0)
            parts.append(
                f'<polygon class="area {cls}" points="{x(x0):.1f},{base:.1f} {coords} '
                f'{x(x1):.1f},{base:.1f}"/>'
            )
        if len(s.points) == 1:
            (ts, v), = s.points
            parts.append(f'<circle class="dot {cls}" cx="{x(ts):.1f}" cy="{y(v):.1f}" r="3"/>')
        else:
            parts.append(f'<polyline class="line {cls}" points="{coords}"/>')
        for ts, v in s.points:
            # An invisible hit target per point gives a native tooltip without script.
            parts.append(
                f'<circle class="hit" cx="{x(ts):.1f}" cy="{y(v):.1f}" r="6">'
                f"<title>{escape(s.label)} at {_hhmm(ts)} UTC: {escape(y_format(v))}</title>"
                f"</circle>"
            )
    parts.append("</svg>")
    if len(series) > 1:
        parts.append('<ul class="legend">')
        for s in series:
            parts.append(
                f'<li><svg class="swatch" viewBox="0 0 10 10" aria-hidden="true">'
                f'<rect class="fill {escape(s.css_class)}" width="10" height="10" rx="2"/></svg>'
                f"{escape(s.label)}</li>"
            )
        parts.append("</ul>")
    return Markup("".join(parts))


def sparkline(points: Sequence[Point], *, since: float, until: float, title: str) -> Markup:
    """A tiny line without axes, for a table cell."""
    width, height = 120, 28
    span = max(until - since, 1e-9)
    top_value = nice_ceiling(max((v for _, v in points), default=0.0))
    coords = " ".join(
        f"{(min(max(ts, since), until) - since) / span * width:.1f},"
        f"{height - 2 - v / top_value * (height - 4):.1f}"
        for ts, v in points
    )
    body = f'<polyline class="line series-0" points="{coords}"/>' if len(points) > 1 else ""
    return Markup(
        f'<svg class="sparkline" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{escape(title)}"><title>{escape(title)}</title>'
        f'<line class="grid" x1="0" x2="{width}" y1="{height - 2}" y2="{height - 2}"/>{body}</svg>'
    )


def meter(fraction: float, *, css_class: str = "series-0", title: str = "") -> Markup:
    """A horizontal bar filled to ``fraction`` (0..1): bar lists and ratios."""
    filled = max(0.0, min(fraction, 1.0)) * 100
    return Markup(
        f'<svg class="meter" viewBox="0 0 100 8" preserveAspectRatio="none" aria-hidden="true">'
        f"<title>{escape(title)}</title>"
        f'<rect class="track" width="100" height="8" rx="2"/>'
        f'<rect class="fill {escape(css_class)}" width="{filled:.2f}" height="8" rx="2"/></svg>'
    )


def stacked_bar(parts: Sequence[tuple[str, float, str]]) -> Markup:
    """One bar split into labelled parts ``(label, seconds, css class)``: the timing breakdown."""
    total = sum(value for _, value, _ in parts) or 1.0
    out = ['<svg class="stacked" viewBox="0 0 100 10" preserveAspectRatio="none" role="img">']
    offset = 0.0
    for label, value, css_class in parts:
        share = value / total * 100
        out.append(
            f'<rect class="fill {escape(css_class)}" x="{offset:.3f}" width="{share:.3f}" '
            f'height="10"><title>{escape(label)}</title></rect>'
        )
        offset += share
    out.append("</svg>")
    return Markup("".join(out))
