"""Benchmarks (`make bench`). Figures are printed, never asserted: these machines are shared and noisy,
so each figure comes with a ratio against a baseline measured in the same run."""
