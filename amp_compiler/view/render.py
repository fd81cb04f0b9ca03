"""Pictures of a precision plan in one call: ``graph_view`` then one format ("svg", "html",
"dot" or "mermaid"), as ``amp-compiler inspect`` draws them.

    >>> text = render(amp, "html", collapse=3, title="gpt")
"""

from __future__ import annotations

from amp_compiler.errors import ConfigError
from amp_compiler.view.graph_view import graph_view
from amp_compiler.view.page import to_html
from amp_compiler.view.svg import to_svg
from amp_compiler.view.text import to_dot, to_mermaid

__all__ = ["render", "FORMATS"]


FORMATS = ("svg", "html", "dot", "mermaid")


def render(amp, fmt: str, *, collapse: str | int | None = "auto", title: str | None = None,
           engine: str = "auto", **view_options) -> str:
    """``graph_view`` then one format: "svg" | "html" | "dot" | "mermaid".

    Example:
        >>> text = render(amp, "mermaid", collapse="none")
        >>> text.splitlines()[0]
        'flowchart TD'
    """
    if fmt not in FORMATS:
        raise ConfigError(f"format {fmt!r}: use one of {', '.join(FORMATS)}")
    view = graph_view(amp, collapse=collapse, title=title, **view_options)
    if fmt == "dot":
        return to_dot(view)
    if fmt == "mermaid":
        return to_mermaid(view)
    if fmt == "svg":
        return to_svg(view, engine=engine)
    return to_html(view, engine=engine)
