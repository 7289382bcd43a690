"""Report tables: every table of the paper rebuilt from run results, beside the paper's numbers.

``mpvg report`` (:mod:`mpvg.reporting.commands`) reads only ``runs/**/result.json`` and
``paper_numbers.csv``; docs/reports.md describes the output and the choices made.
"""
