"""What a run leaves on disk: the run directory, its lock, provenance, and how failures are recorded."""
