"""What both readers (analysis, reporting) read results through, below both of them.

``runs`` reads the finished runs (``runs/**/result.json``) and keeps those the command line says
are current; ``paper`` holds the paper's own numbers (paper_numbers.csv) and how a cell finds its
row; ``render`` is the one table model with its Markdown and LaTeX renderings and a page's scale
notice. It imports nothing of the readers or the workflow (docs/contracts.md, "Layers").
"""
