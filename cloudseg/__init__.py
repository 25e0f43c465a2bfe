"""cloudseg: cloud segmentation of Sentinel-2 chips for the On Cloud N challenge."""

# Before anything imports MLflow, albumentations or huggingface_hub: their usage telemetry and update checks are
# off in cloudseg's processes and in every subprocess they start, unless the user set the switches themselves
# or opted in with CLOUDSEG_TELEMETRY=1 (see cloudseg/privacy.py and the README's "Privacy / telemetry").
from cloudseg.privacy import apply_defaults as _apply_privacy_defaults

_apply_privacy_defaults()

__version__ = "0.1.0"
