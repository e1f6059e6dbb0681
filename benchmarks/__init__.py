"""Benchmarks: flowstore measured side by side with the raw limit, in one run, as ratios."""
