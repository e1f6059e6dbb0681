"""Reliability tests (issue 8): faults survived, bad input refused, nothing lost or counted twice.

Quick variants run in CI; `FLOWSTORE_LONG=1` runs the long ones, and `python -m
tests.reliability.report` runs those and writes `RELIABILITY.md`.
"""
