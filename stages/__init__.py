"""tidepool: DVC stages that build leak-free, reproducible WebDataset releases from marine image sources."""
