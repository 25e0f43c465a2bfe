"""Band names: the competition's four, the supplementary ones ``cloudseg add-bands`` fetches, and the parsing of
config key ``bands``. Imports nothing heavy (``Config`` checks its ``bands`` through this module)."""

from __future__ import annotations

import re

BANDS: tuple[str, ...] = ("B02", "B03", "B04", "B08")  # the competition's bands, in every chip folder
# Band files that ``cloudseg add-bands`` may write beside them (Sentinel-2 L2A asset names on the Planetary
# Computer); any other name of letters, digits and underscores is allowed for bands a user makes themselves.
SUPPLEMENTARY_BANDS: tuple[str, ...] = ("B01", "B05", "B06", "B07", "B8A", "B09", "B11", "B12", "SCL", "AOT", "WVP")
BAND_NAME = re.compile(r"^[A-Za-z0-9_]{1,32}$")


def parse_bands(text: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``"B02,B03,B04,B08,B11"`` -> ``("B02", "B03", "B04", "B08", "B11")``: a model's input bands in order.

    Raises:
        ValueError: empty, repeated, or a name that cannot be a band file's stem.
    """
    names = [b.strip() for b in text.split(",")] if isinstance(text, str) else [str(b).strip() for b in text]
    names = [b for b in names if b]
    if not names:
        raise ValueError(f"bands={text!r}: name at least one band, e.g. {','.join(BANDS)}")
    bad = [b for b in names if not BAND_NAME.match(b)]
    if bad:
        raise ValueError(f"bands={text!r}: {bad} are not band names (letters, digits, underscores)")
    twice = sorted({b for b in names if names.count(b) > 1})
    if twice:
        raise ValueError(f"bands={text!r}: {twice} appear more than once")
    return tuple(names)


def band_dtypes(band: str) -> tuple[str, ...]:
    """The dtypes a band file may have: the competition's bands are uint16; supplementary bands are uint16
    (reflectance x 10,000) or uint8 (classes such as SCL)."""
    return ("uint16",) if band in BANDS else ("uint16", "uint8")
