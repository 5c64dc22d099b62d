"""ingest@<source>: raw upstream files -> the common sample, point and quarantine tables."""
