"""Readers and writers for every supported format, augmentation, tiling, splits, micro-CT volumes and
their slices, and the bundled sample data.

Imported by Ray workers, so nothing here may import `platform.*`.
"""
