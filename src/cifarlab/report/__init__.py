"""Reports: the self-contained report.html of a run (and of several), and its plots."""
