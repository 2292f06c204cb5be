"""Where metrics go besides metrics.jsonl: the tracker interface, W&B, histograms, the console, dashboards."""
