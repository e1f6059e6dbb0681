"""Charts drawn on the server as inline SVG: readable without JavaScript, no chart library.

A line chart over time buckets (`line_chart`) and a bar chart over named bins (`bar_chart`).
Every point carries `data-series`, `data-index` and `data-value` attributes and a `<title>` (the
browser shows it as a tooltip), so tests and screen readers can check what is drawn; the page
shows the same numbers in a table next to each chart. All text is escaped.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from markupsafe import Markup

__all__ = ["Series", "bar_chart", "line_chart", "nice_ceiling"]

_W, _H = 720.0, 220.0
_LEFT, _RIGHT, _TOP, _BOTTOM = 56.0, 12.0, 12.0, 34.0
_FONT = 'font-family="system-ui, sans-serif" fill="#1b1f24"'


@dataclass(frozen=True)
class Series:
    """One line of a chart: a name, a value per bucket, a colour and a dash pattern."""

    key: str
    label: str
    values: Sequence[float | None]
    """None where there is nothing to show (a time without attempts has no response time)."""
    colour: str
    dash: str = ""


def nice_ceiling(value: float) -> float:
    """The smallest 1, 2, 2.5 or 5 times a power of ten at or above `value` (1 for 0)."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for factor in (1, 2, 2.5, 5, 10):
        if factor * power >= value:
            return float(factor * power)
    return float(10 * power)  # pragma: no cover - the loop always returns


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _n(value: float) -> str:
    return f"{value:.1f}"


def _axis(top: float, fmt: Callable[[float], str]) -> list[str]:
    out = []
    for i in range(5):
        value = top * i / 4
        y = _TOP + (_H - _TOP - _BOTTOM) * (1 - i / 4)
        out.append(
            f'<line x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{_n(y)}" y2="{_n(y)}" '
            f'stroke="{"#8a94a1" if i == 0 else "#e3e7ec"}"/>'
            f'<text x="{_LEFT - 6}" y="{_n(y + 4)}" text-anchor="end" font-size="11" {_FONT}>{_e(fmt(value))}</text>'
        )
    return out


def line_chart(
    label: str,
    starts: Sequence[datetime],
    series: Sequence[Series],
    *,
    time_format: str,
    value_format: Callable[[float], str] = lambda v: f"{v:g}",
    chart_id: str,
) -> Markup:
    """A line chart of `series` over the buckets starting at `starts` (oldest first)."""
    count = len(starts)
    top = nice_ceiling(max((v for s in series for v in s.values if v is not None), default=0.0))
    plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM

    def x(i: int) -> float:
        return _LEFT + (plot_w * (i + 0.5) / count if count else 0.0)

    def y(value: float) -> float:
        return _TOP + plot_h * (1 - value / top)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" id="{_e(chart_id)}" role="img" '
        f'aria-label="{_e(label)}" viewBox="0 0 {_W:.0f} {_H:.0f}" data-max="{top:g}">',
        f"<title>{_e(label)}</title>",
        *_axis(top, value_format),
    ]
    ticks = max(1, math.ceil(count / 8))  # at most about eight time labels
    for i in range(0, count, ticks):
        out.append(
            f'<text x="{_n(x(i))}" y="{_H - _BOTTOM + 16}" text-anchor="middle" '
            f'font-size="11" {_FONT}>{_e(starts[i].strftime(time_format))}</text>'
        )
    for s in series:
        dash = f' stroke-dasharray="{s.dash}"' if s.dash else ""
        out.append(f'<g class="series" data-series="{_e(s.key)}">')
        # One line per run of values; a missing value is a gap, not a zero.
        runs: list[list[str]] = [[]]
        for i, v in enumerate(s.values):
            if v is None:
                runs.append([])
            else:
                runs[-1].append(f"{_n(x(i))},{_n(y(v))}")
        for run in runs:
            if len(run) > 1:
                out.append(
                    f'<polyline points="{" ".join(run)}" fill="none" stroke="{s.colour}" '
                    f'stroke-width="2"{dash}/>'
                )
        for i, v in enumerate(s.values):
            if v is None:
                continue
            when = starts[i].strftime(time_format)
            out.append(
                f'<circle class="point" cx="{_n(x(i))}" cy="{_n(y(v))}" r="2.5" '
                f'fill="{s.colour}" data-series="{_e(s.key)}" data-index="{i}" '
                f'data-at="{starts[i].isoformat()}" data-value="{v}"><title>{_e(f"{when}: {s.label} {value_format(v)}")}'
                "</title></circle>"
            )
        out.append("</g>")
    out.append("</svg>")
    return Markup("".join(out))  # every text above went through _e


def bar_chart(
    label: str, bins: Sequence[str], values: Sequence[int], *, colour: str, chart_id: str
) -> Markup:
    """A bar chart of counts per named bin (a histogram)."""
    top = nice_ceiling(max(values, default=0))
    width, height = 400.0, 120.0
    left, bottom, top_pad = 30.0, 22.0, 8.0
    plot_w, plot_h = width - left - 8, height - bottom - top_pad
    slot = plot_w / max(1, len(bins))
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart histogram" id="{_e(chart_id)}" '
        f'role="img" aria-label="{_e(label)}" viewBox="0 0 {width:.0f} {height:.0f}" '
        f'data-max="{top:g}">',
        f"<title>{_e(label)}</title>",
        f'<line x1="{left}" x2="{width - 8}" y1="{height - bottom}" y2="{height - bottom}" '
        'stroke="#8a94a1"/>',
        f'<text x="{left - 4}" y="{top_pad + 8}" text-anchor="end" font-size="11" {_FONT}>'
        f"{top:g}</text>",
    ]
    for i, (name, value) in enumerate(zip(bins, values, strict=True)):
        bar_h = plot_h * value / top
        x = left + i * slot + slot * 0.15
        out.append(
            f'<rect class="bin" x="{_n(x)}" y="{_n(height - bottom - bar_h)}" '
            f'width="{_n(slot * 0.7)}" height="{_n(bar_h)}" fill="{colour}" data-index="{i}" '
            f'data-value="{value}"><title>{_e(f"{name}: {value}")}</title></rect>'
            f'<text x="{_n(x + slot * 0.35)}" y="{height - bottom + 13}" text-anchor="middle" '
            f'{_FONT} font-size="11">{_e(name)}</text>'
        )
    out.append("</svg>")
    return Markup("".join(out))  # every text above went through _e
