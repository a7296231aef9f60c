"""The AMSS units report (:func:`equimodal.amss.explain.describe_units`) as rich tables, for ``equimodal units``."""

from __future__ import annotations

from rich import box
from rich.table import Table

from ..amss.explain import ParamRow, UnitsReport, count_text


# ------------------------------------------------------------------------------ the CLI's tables
def rich_tables(report: UnitsReport) -> list[Table]:
    """The report as rich tables (one per modality, one for the rest, one of totals), for the CLI."""

    def table(title: str, rows: tuple[ParamRow, ...], strip: str) -> Table:
        t = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
        t.add_column("parameter", overflow="fold", ratio=6)
        t.add_column("unit", no_wrap=True)
        t.add_column("n", justify="right", no_wrap=True)
        t.add_column("how / why not", overflow="fold", ratio=5)
        for r in rows:
            name = r.name[len(strip) :] if r.name.startswith(strip) else r.name
            t.add_row(name, r.kind or "-", count_text(r), r.note, style=None if r.masked else "dim")
        return t

    tables = []
    totals = report.totals()
    for m, rows in report.modalities.items():
        tot = totals[m]
        title = (
            f"{m} (encoders.{m}.*): {tot['tensors']} masked tensors, {tot['units']} units, "
            f"{tot['masked_weights']:,} of {tot['weights']:,} weights"
        )
        tables.append(table(title, rows, f"encoders.{m}."))
    if report.other:
        tables.append(table("outside the encoders (not masked)", report.other, ""))
    t = Table(title="totals", box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
    for col in ("modality", "tensors", "units", "masked weights", "weights", "not masked"):
        t.add_column(col, justify="left" if col == "modality" else "right")
    for m, tot in totals.items():
        t.add_row(m, *(f"{tot[k]:,}" for k in ("tensors", "units", "masked_weights", "weights", "unmasked")))
    tables.append(t)
    return tables
