"""Reporting: learning curves, the HTML report and the AMSS units tables, drawn from run files."""
