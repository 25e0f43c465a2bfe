"""Chips in the competition layout: reading, validating, splitting, augmenting, synthesising."""

from cloudseg.data.io import BANDS, CHIP_SIZE, read_chip, read_label  # noqa: F401
