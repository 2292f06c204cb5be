"""Reading runs back: the paper table and its statistics, figures, report.html, demos."""
