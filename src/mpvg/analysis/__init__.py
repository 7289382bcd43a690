"""Analysis figures (paper Figures 2, 4, 6, 7, 8) from trained checkpoints.

``stats`` holds the maths, ``extract`` turns a model's ``forward_analysis`` into batch-mean
arrays, ``figures`` draws them, ``analyze`` picks the cells and writes analysis.json, and
``commands`` is ``mpvg analyze``. docs/reports.md describes the choices.
"""
