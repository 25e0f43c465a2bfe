"""cloudseg: cloud segmentation of Sentinel-2 chips for the On Cloud N challenge."""

__version__ = "0.1.0"
