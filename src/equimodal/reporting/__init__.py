"""Reporting: what results look like, drawn from plain data and from the files commands write.

Learning curves (:mod:`~equimodal.reporting.curves`), the HTML report (:mod:`~equimodal.reporting.html`),
the figures, statistics and tables of comparisons, studies and diagnoses
(:mod:`~equimodal.reporting.figures`, :mod:`~equimodal.reporting.statistics`,
:mod:`~equimodal.reporting.tables`), the files of their folders (:mod:`~equimodal.reporting.folders`)
and the AMSS units tables (:mod:`~equimodal.reporting.units`). Reporting sits below the experiments:
they draw their figures and write their tables with it, and it renders files without knowing how they
were made (it imports nothing from :mod:`equimodal.experiments`).
"""
