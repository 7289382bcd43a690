"""One table model, two renderings: Markdown (to read on the forge) and LaTeX with booktabs.

Renderers are pure functions of a :class:`Table`, so the same results always give the same
bytes (tests rebuild twice and compare). A page (a Markdown file, the LaTeX document) carries
the scale notice once; captions never repeat it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

LATEX_PREAMBLE = (
    "\\documentclass{article}\n"
    "\\usepackage[T1]{fontenc}\n"
    "\\usepackage[margin=1.5cm,landscape]{geometry}\n"
    "\\usepackage{booktabs}\n"
    "\\usepackage{longtable}\n"
)

#: Tables with more rows than this are set as a ``longtable`` that breaks across pages.
LONG_TABLE_ROWS = 30

#: LaTeX float environment of each table kind; the float's counter prints the paper's number.
FLOAT_ENV = {"Table": "table", "Figure": "figure"}


@dataclass(frozen=True)
class Entry:
    """A table cell: its text and whether it is the best of its group (bold)."""

    text: str
    bold: bool = False


@dataclass
class Table:
    """A rendered-agnostic table: header, rows of entries, rule before each new group.

    ``number`` is the paper's number of what the table reproduces ("1" for Table 1; "5" with
    ``kind="Figure"`` for the numbers behind Figure 5); ``None`` for a table of our own, which
    stays unnumbered. The title never holds the number: the renderers write "Table 1: " once.
    """

    name: str                      # file stem, e.g. "table1"
    title: str                     # e.g. "ImageNet-1K" (the heading reads "Table 1: ImageNet-1K")
    caption: str
    columns: list[str]
    align: str                     # one of l/r/c per column
    rows: list[list[Entry]] = field(default_factory=list)
    group_starts: set[int] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)
    kind: str = "Table"            # "Table" or "Figure": which of the paper's counters it takes
    number: Optional[str] = None   # the paper's number; None: unnumbered

    def __post_init__(self):
        if self.kind not in FLOAT_ENV:
            raise ValueError(f"{self.name}: kind {self.kind!r} is not one of {sorted(FLOAT_ENV)}")

    @property
    def heading(self) -> str:
        """``"Table 1: ImageNet-1K"``, or the title alone when unnumbered."""
        return f"{self.kind} {self.number}: {self.title}" if self.number else self.title

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
    lines = [f"### {t.heading}", "", t.caption, ""]
    lines.append("| " + " | ".join(c.replace("|", "\\|") for c in t.columns) + " |")
    lines.append("|" + "|".join(rule[a] for a in t.align) + "|")
    for row in t.rows:
        lines.append("| " + " | ".join(_md_cell(e) for e in row) + " |")
    if t.notes:
        lines.append("")
        lines.extend(f"- {n}" for n in t.notes)
    return "\n".join(lines) + "\n"


def render_markdown_page(tables: list[Table], notice: str = "", heading: str = "") -> str:
    """A Markdown page: an optional ``# heading``, the notice once (as a quote), the tables."""
    head = ([f"# {heading}", ""] if heading else []) + ([f"> {notice}", ""] if notice else [])
    return "".join(line + "\n" for line in head) + "\n".join(render_markdown(t) for t in tables)


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


def _tex_body(t: Table) -> list[str]:
    """The body rows of a table, groups separated by ``\\midrule``."""
    lines = []
    for i, row in enumerate(t.rows):
        if i in t.group_starts:
            lines.append("\\midrule")
        lines.append(" & ".join(_tex_cell(e) for e in row) + " \\\\")
    return lines


def render_latex(t: Table) -> str:
    """A float with a booktabs ``tabular`` (needs ``\\usepackage{booktabs}``), or a ``longtable``
    (needs ``\\usepackage{longtable}``) that breaks across pages for more than
    :data:`LONG_TABLE_ROWS` rows, so no row falls off the page.

    A numbered table takes the paper's number: its counter (``\\thetable``, ``\\thefigure`` for a
    figure's numbers) is set for this table only, so the caption reads "Table 1: ImageNet-1K. ..."
    exactly once, in whatever document includes the fragment. An unnumbered table has no
    ``\\caption`` (there is nothing to number) and leads with its bold title instead.
    """
    env = FLOAT_ENV[t.kind]
    title = latex_escape(t.title) + "."
    caption = f" {latex_escape(t.caption)}" if t.caption else ""
    number = [f"\\renewcommand{{\\the{env}}}{{{latex_escape(t.number)}}}"] if t.number else []
    lead = [f"{{\\raggedright\\textbf{{{title}}}{caption}\\par}}", "\\medskip"]
    header = ["\\toprule", " & ".join(latex_escape(c) for c in t.columns) + " \\\\", "\\midrule"]
    notes = ["\\par\\smallskip\\footnotesize"] + [latex_escape(n) + "\\par" for n in t.notes] if t.notes else []
    if len(t.rows) > LONG_TABLE_ROWS:
        if t.kind != "Table":
            raise ValueError(f"{t.name}: a {t.kind} longer than {LONG_TABLE_ROWS} rows cannot break across pages")
        first = ([f"\\caption{{{title}{caption}}}\\label{{tab:{t.name}}}\\\\"] if t.number else [])
        lines = ["\\begingroup", "\\small", *number, *([] if t.number else lead),
                 f"\\begin{{longtable}}{{{t.align}}}", *first, *header, "\\endfirsthead",
                 *header, "\\endhead", *_tex_body(t), "\\bottomrule", "\\end{longtable}", *notes,
                 "\\endgroup"]
        return "\n".join(lines) + "\n"
    lines = [f"\\begin{{{env}}}[htbp]", "\\centering", "\\small"]
    if t.number:
        lines += [*number, f"\\caption{{{title}{caption}}}", f"\\label{{tab:{t.name}}}"]
    else:
        lines += lead
    lines += [f"\\begin{{tabular}}{{{t.align}}}", *header, *_tex_body(t), "\\bottomrule", "\\end{tabular}",
              *notes, f"\\end{{{env}}}"]
    return "\n".join(lines) + "\n"


def latex_comment(text: str) -> str:
    """``text`` as LaTeX comment lines (a fragment's scale notice; the including page prints its own)."""
    return "".join(f"% {line}\n" for line in text.splitlines())


def latex_document(tables: list[Table], notice: str = "") -> str:
    """A standalone document holding every table (``pdflatex tables.tex`` builds it).

    ``notice`` is printed once per page, in the footer beside the page number (page style
    ``notice``), instead of in every caption.
    """
    style = ""
    if notice:
        foot = f"\\parbox[t]{{\\textwidth}}{{\\footnotesize {latex_escape(notice)}\\hfill\\thepage}}"
        style = ("\\makeatletter\n"
                 "\\def\\ps@notice{\\let\\@oddhead\\@empty\\let\\@evenhead\\@empty"
                 f"\\def\\@oddfoot{{{foot}}}\\let\\@evenfoot\\@oddfoot}}\n"
                 "\\makeatother\n"
                 "\\pagestyle{notice}\n")
    body = "\n\\clearpage\n".join(render_latex(t) for t in tables)
    return LATEX_PREAMBLE + style + "\\begin{document}\n" + body + "\\end{document}\n"


def scale_note(scale: str) -> str:
    """The scale notice of a page (printed once per page, never in a caption)."""
    if scale == "paper":
        return "Scale: paper (the paper's datasets, models and schedules)."
    return (f"Scale: {scale}. The reproduced numbers come from shrunk models trained for a few epochs on "
            "generated data: they show that the pipeline runs end to end and are not comparable with the "
            "paper's values.")
