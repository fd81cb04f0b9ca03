"""Pictures and tables of a precision plan: the report (``report.py``) and the graph view drawn
as DOT, Mermaid, SVG or HTML (``render.py``). README.md says which file does what."""
