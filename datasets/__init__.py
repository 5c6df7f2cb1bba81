"""Readers for the supported annotation formats, augmentation, splits and the bundled sample data.

Imported by Ray workers, so nothing here may import `platform.*`.
"""
