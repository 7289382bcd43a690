"""One table model, two renderings: Markdown (to read on the forge) and LaTeX with booktabs.

Renderers are pure functions of a :class:`Table`, so the same results always give the same
bytes (tests rebuild twice and compare).
"""
from __future__ import annotations

from dataclasses import dataclass, field

LATEX_PREAMBLE = (
    "\\documentclass{article}\n"
    "\\usepackage[T1]{fontenc}\n"
    "\\usepackage[margin=1.5cm,landscape]{geometry}\n"
    "\\usepackage{booktabs}\n"
)


@dataclass(frozen=True)
class Entry:
    """A table cell: its text and whether it is the best of its group (bold)."""

    text: str
    bold: bool = False


@dataclass
class Table:
    """A rendered-agnostic table: header, rows of entries, rule before each new group."""

    name: str                      # file stem, e.g. "table1"
    title: str                     # e.g. "Table 1: ImageNet-1K top-1"
    caption: str
    columns: list[str]
    align: str                     # one of l/r/c per column
    rows: list[list[Entry]] = field(default_factory=list)
    group_starts: set[int] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)

    def add_row(self, entries: list, new_group: bool = False) -> None:
        row = [e if isinstance(e, Entry) else Entry(str(e)) for e in entries]
        if len(row) != len(self.columns):
            raise ValueError(f"{self.name}: row has {len(row)} entries, header has {len(self.columns)}")
        if new_group and self.rows:
            self.group_starts.add(len(self.rows))
        self.rows.append(row)


def _md_cell(e: Entry) -> str:
    text = e.text.replace("|", "\\|")
    return f"**{text}**" if e.bold and text else text


def render_markdown(t: Table) -> str:
    """A heading, the caption, a pipe table and the notes."""
    if len(t.align) != len(t.columns):
        raise ValueError(f"{t.name}: align {t.align!r} does not give one letter per column ({len(t.columns)})")
    rule = {"l": ":--", "r": "--:", "c": ":-:"}
    lines = [f"### {t.title}", "", t.caption, ""]
    lines.append("| " + " | ".join(c.replace("|", "\\|") for c in t.columns) + " |")
    lines.append("|" + "|".join(rule[a] for a in t.align) + "|")
    for row in t.rows:
        lines.append("| " + " | ".join(_md_cell(e) for e in row) + " |")
    if t.notes:
        lines.append("")
        lines.extend(f"- {n}" for n in t.notes)
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "±": r"$\pm$", "Δ": r"$\Delta$", "−": r"$-$", "—": "---", "–": "--", "×": r"$\times$", "≥": r"$\geq$",
}


def latex_escape(text: str) -> str:
    """Escape LaTeX specials and map the few non-ASCII signs the tables use."""
    out = "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)
    bad = sorted({ch for ch in out if ord(ch) > 127})
    if bad:
        raise ValueError(f"latex_escape: no LaTeX form for {bad} in {text!r}; add it to _LATEX_SPECIAL")
    return out


def _tex_cell(e: Entry) -> str:
    text = latex_escape(e.text)
    return f"\\textbf{{{text}}}" if e.bold and text else text


def render_latex(t: Table) -> str:
    """A ``table`` float with a booktabs ``tabular`` (needs ``\\usepackage{booktabs}``)."""
    lines = [
        "\\begin{table}[htbp]",
        "\\centering",
        "\\small",
        f"\\caption{{{latex_escape(t.title)}. {latex_escape(t.caption)}}}",
        f"\\label{{tab:{t.name}}}",
        f"\\begin{{tabular}}{{{t.align}}}",
        "\\toprule",
        " & ".join(latex_escape(c) for c in t.columns) + " \\\\",
        "\\midrule",
    ]
    for i, row in enumerate(t.rows):
        if i in t.group_starts:
            lines.append("\\midrule")
        lines.append(" & ".join(_tex_cell(e) for e in row) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    if t.notes:
        lines.append("\\par\\smallskip\\footnotesize")
        lines.extend(latex_escape(n) + "\\par" for n in t.notes)
    lines.append("\\end{table}")
    return "\n".join(lines) + "\n"


def latex_document(tables: list[Table]) -> str:
    """A standalone document holding every table (``pdflatex tables.tex`` builds it)."""
    body = "\n\\clearpage\n".join(render_latex(t) for t in tables)
    return LATEX_PREAMBLE + "\\begin{document}\n" + body + "\\end{document}\n"
