"""The look of a precision plan's picture: one colour table that every format (DOT, SVG, HTML,
Mermaid) draws with.

    low-precision node   green fill            fp32 node        orange fill
    fp32-accumulating    thick blue outline    unknown op       red dashed outline
    cast                 purple hexagon; the edges into and out of it are purple
    non-float value      grey                  input / output   white, rounded

    >>> STYLES["low"]["fill"], STYLES["low"]["stroke"]
    ('#8fd694', '#2e7d32')
"""

from __future__ import annotations

__all__ = ["STYLES", "ACC_STROKE", "UNKNOWN_STROKE", "CAST_EDGE", "PLAIN_EDGE"]

# Look of each node class: fill, outline, text colour. One table, used by every format.
STYLES: dict[str, dict[str, str]] = {
    "low": {"fill": "#8fd694", "stroke": "#2e7d32", "text": "#0b2e0f"},
    "fp32": {"fill": "#f7b267", "stroke": "#c46a00", "text": "#3b1f00"},
    "cast": {"fill": "#c9a6e4", "stroke": "#6a1b9a", "text": "#2a0840"},
    "nonfloat": {"fill": "#e2e2e2", "stroke": "#8a8a8a", "text": "#333333"},
    "io": {"fill": "#ffffff", "stroke": "#444444", "text": "#111111"},
    "param": {"fill": "#dce6f2", "stroke": "#6b7f99", "text": "#1d2a3a"},
}
ACC_STROKE = "#1f4e9c"       # outline of fp32_acc nodes (layer_norm, softmax, ...)
UNKNOWN_STROKE = "#d32f2f"   # outline of ops no policy table knows
CAST_EDGE = "#8e24aa"
PLAIN_EDGE = "#8c8c8c"
