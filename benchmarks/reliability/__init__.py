"""Reliability suites: crash, agent crash, partition, disk, load, fuzz, clock (figures)."""
