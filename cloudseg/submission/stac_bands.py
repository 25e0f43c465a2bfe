"""Supplementary Sentinel-2 bands for a chip, from a STAC API: search, choose the acquisition, read the chip's window.

Used twice, unchanged: by ``cloudseg add-bands`` (to write ``<chip>/<band>.tif`` for training) and, copied beside
``main.py``, by submissions whose models read bands the test chips do not have. So this file runs under the
competition runtime's versions as well as here: Python 3.9 syntax, pystac-client 0.3.1 or newer,
planetary-computer 0.4.2 or newer (only where the API is the Planetary Computer's), rasterio 1.2.6 or newer,
numpy; nothing else outside the standard library.

For one chip (its grid read from its own ``B02.tif``, its time from the metadata's ``datetime``):

1. search the collection by the chip's bounds (EPSG:4326) and its time +/- ``window_s``;
2. choose one item: the nearest acquisition in time (a chip is cut from one acquisition; neighbouring tiles of
   the same datatake share its time), then the one whose footprint covers most of the chip (the tile it was cut
   from: at a tile's edge the neighbour's overlap only half covers it), then the smallest id, so the choice is
   repeatable;
3. for each band, open the item's asset (signed first where the API is the Planetary Computer's), read only the
   chip's window of the cloud-optimised GeoTIFF, resampled onto the chip's exact grid: bilinear for
   reflectance, nearest for class bands (``SCL``). The result keeps the asset's dtype.

Every network step has a timeout and a bounded number of retries; ``fetch`` raises ``FetchError`` naming the chip
and the reason, so callers list the chip and go on.
"""

from __future__ import annotations

import datetime as _dt
import threading
import time
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

PLANETARY_COMPUTER = "https://planetarycomputer.microsoft.com/api/stac/v1"
DEFAULT_COLLECTION = "sentinel-2-l2a"
CLASS_BANDS = frozenset({"SCL"})  # classes, not reflectance: nearest-neighbour resampling
WINDOW_S = 3600.0  # how far from the chip's time an acquisition may be
TIMEOUT_S = 30.0  # per HTTP request (search and reads)
RETRIES = 2  # extra attempts after a failed search or read
RETRY_DELAY_S = 0.5


class FetchError(RuntimeError):
    """A chip's band could not be had: no matching item, a missing asset, or the server failing."""


class ChipGrid(NamedTuple):
    """Where a chip lies: its CRS and affine transform (GDAL order), size, and its corners in lon/lat."""

    crs: Any
    transform: Any
    width: int
    height: int
    bbox: Tuple[float, float, float, float]  # min lon, min lat, max lon, max lat
    points: List[Tuple[float, float]]  # a 3x3 grid of lon/lat points over the chip, for coverage


def chip_grid(path: Any) -> ChipGrid:
    """The grid of the chip one of whose band files is ``path`` (header only)."""
    import rasterio
    from rasterio.warp import transform as warp_points

    with rasterio.open(str(path)) as src:
        crs, tr, w, h = src.crs, src.transform, src.width, src.height
    if crs is None:
        raise FetchError("%s has no CRS: the chip cannot be placed on the map" % path)
    xs, ys = [], []
    for fy in (0.0, 0.5, 1.0):
        for fx in (0.0, 0.5, 1.0):
            x, y = tr * (fx * w, fy * h)
            xs.append(x)
            ys.append(y)
    lons, lats = warp_points(crs, "EPSG:4326", xs, ys)
    points = list(zip([float(v) for v in lons], [float(v) for v in lats]))
    bbox = (min(lons), min(lats), max(lons), max(lats))
    return ChipGrid(crs, tr, w, h, tuple(float(v) for v in bbox), points)


def parse_time(text: str) -> _dt.datetime:
    """An ISO 8601 time (``2020-04-29T08:20:47Z``) as an aware UTC datetime."""
    text = str(text).strip()
    if not text:
        raise FetchError("no datetime")
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    try:
        t = _dt.datetime.fromisoformat(text)
    except ValueError:
        raise FetchError("datetime %r is not ISO 8601" % text)
    return t if t.tzinfo else t.replace(tzinfo=_dt.timezone.utc)


def _iso(t: _dt.datetime) -> str:
    return t.astimezone(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _inside(lon: float, lat: float, ring: Sequence[Sequence[float]]) -> bool:
    """Ray casting: whether (lon, lat) lies inside one linear ring."""
    inside = False
    n = len(ring)
    for i in range(n):
        x1, y1 = ring[i][0], ring[i][1]
        x2, y2 = ring[(i + 1) % n][0], ring[(i + 1) % n][1]
        if (y1 > lat) != (y2 > lat):
            x = x1 + (lat - y1) * (x2 - x1) / (y2 - y1)
            if x > lon:
                inside = not inside
    return inside


def coverage(geometry: Optional[Dict[str, Any]], points: Sequence[Tuple[float, float]]) -> float:
    """Share of ``points`` inside a GeoJSON Polygon or MultiPolygon (holes respected)."""
    if not geometry:
        return 0.0
    if geometry.get("type") == "Polygon":
        polygons = [geometry["coordinates"]]
    elif geometry.get("type") == "MultiPolygon":
        polygons = geometry["coordinates"]
    else:
        return 0.0
    hits = 0
    for lon, lat in points:
        for rings in polygons:
            if rings and _inside(lon, lat, rings[0]) and not any(_inside(lon, lat, r) for r in rings[1:]):
                hits += 1
                break
    return hits / float(max(len(points), 1))


def _item_time(item: Any) -> Optional[_dt.datetime]:
    t = getattr(item, "datetime", None)
    if t is None:
        props = getattr(item, "properties", {}) or {}
        text = props.get("datetime") or props.get("start_datetime")
        return parse_time(text) if text else None
    return t if t.tzinfo else t.replace(tzinfo=_dt.timezone.utc)


def choose_item(items: Sequence[Any], grid: ChipGrid, when: _dt.datetime, window_s: float = WINDOW_S) -> Any:
    """The item a chip was cut from (see the module docstring, step 2); None when no item is in the window."""
    ranked = []
    for item in items:
        t = _item_time(item)
        if t is None:
            continue
        dt = abs((t - when).total_seconds())
        if dt > window_s:
            continue
        cover = coverage(getattr(item, "geometry", None), grid.points)
        if cover <= 0:
            continue
        ranked.append((round(dt), -cover, str(getattr(item, "id", "")), item))
    if not ranked:
        return None
    ranked.sort(key=lambda r: r[:3])
    return ranked[0][3]


def _retry(what: str, fn: Any, retries: int = RETRIES) -> Any:
    last = None
    for attempt in range(retries + 1):
        try:
            return fn()
        except FetchError:
            raise
        except Exception as exc:  # HTTP errors, timeouts, GDAL errors: each library raises its own types
            last = exc
            if attempt < retries:
                time.sleep(RETRY_DELAY_S * (attempt + 1))
    raise FetchError("%s failed after %d attempt(s): %s" % (what, retries + 1, _reason(last)))


def _reason(exc: Any) -> str:
    text = " ".join(str(exc).split())
    return "%s: %s" % (type(exc).__name__, text[:300]) if text else type(exc).__name__


class StacBands(object):
    """Fetches bands for chips from one STAC API collection; safe to share between threads.

    Args:
        url: the STAC API root (default the Planetary Computer's).
        collection: the collection searched.
        window_s: how far in time an acquisition may be from the chip's ``datetime``.
        timeout_s: per HTTP request; retries: extra attempts per search and per read.
        sign: sign asset hrefs with ``planetary_computer`` (default: when ``url`` is the Planetary Computer's).
    """

    def __init__(self, url: str = PLANETARY_COMPUTER, collection: str = DEFAULT_COLLECTION,
                 window_s: float = WINDOW_S, timeout_s: float = TIMEOUT_S, retries: int = RETRIES,
                 sign: Optional[bool] = None) -> None:
        self.url = url.rstrip("/")
        self.collection = collection
        self.window_s, self.timeout_s, self.retries = float(window_s), float(timeout_s), int(retries)
        self.sign = ("planetarycomputer.microsoft.com" in self.url) if sign is None else bool(sign)
        self._lock = threading.Lock()
        self._opened = None  # type: Any

    # ------------------------------------------------------------------ search
    def _client(self) -> Any:
        """One client for every thread (its requests session is shared); opened on first use."""
        with self._lock:
            if self._opened is None:
                self._opened = _retry("opening STAC API %s" % self.url, lambda: _open_client(self.url, self.timeout_s),
                                      self.retries)
            return self._opened

    def search(self, grid: ChipGrid, when: _dt.datetime) -> List[Any]:
        """Items of the collection over the chip's bounds within ``window_s`` of ``when``."""
        delta = _dt.timedelta(seconds=self.window_s)
        span = "%s/%s" % (_iso(when - delta), _iso(when + delta))

        def run() -> List[Any]:
            search = self._client().search(collections=[self.collection], bbox=list(grid.bbox), datetime=span,
                                           max_items=50)
            if hasattr(search, "items") and callable(search.items):  # pystac-client >= 0.4
                return list(search.items())
            return list(search.get_items())  # pystac-client 0.3

        return _retry("STAC search %s %s" % (self.url, span), run, self.retries)

    # ------------------------------------------------------------------ read
    def href(self, item: Any, band: str) -> str:
        assets = getattr(item, "assets", {}) or {}
        if band not in assets:
            raise FetchError("item %s has no asset %r (it has %s)" % (getattr(item, "id", "?"), band,
                                                                     ", ".join(sorted(assets)) or "none"))
        href = assets[band].href
        if self.sign:
            import planetary_computer

            href = _retry("signing %s" % href, lambda: _sign(planetary_computer, href), self.retries)
        return href

    def read(self, href: str, band: str, grid: ChipGrid) -> np.ndarray:
        """The asset's pixels on the chip's grid. Shape: (height, width), the asset's dtype."""
        import rasterio
        from rasterio.enums import Resampling
        from rasterio.vrt import WarpedVRT

        resampling = Resampling.nearest if band in CLASS_BANDS else Resampling.bilinear
        env = dict(GDAL_HTTP_TIMEOUT=str(int(max(1, self.timeout_s))),
                   GDAL_HTTP_CONNECTTIMEOUT=str(int(max(1, min(self.timeout_s, 10)))),
                   GDAL_HTTP_MAX_RETRY=str(self.retries), GDAL_HTTP_RETRY_DELAY=str(RETRY_DELAY_S),
                   GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR", CPL_VSIL_CURL_ALLOWED_EXTENSIONS=".tif,.TIF,.tiff",
                   GDAL_HTTP_MULTIRANGE="YES", VSI_CACHE="TRUE")

        def run() -> np.ndarray:
            with rasterio.Env(**env):
                with rasterio.open(href) as src:
                    with WarpedVRT(src, crs=grid.crs, transform=grid.transform, width=grid.width,
                                   height=grid.height, resampling=resampling) as vrt:
                        return vrt.read(1)

        return _retry("reading %s" % href.split("?")[0], run, 0)  # GDAL retries the HTTP requests itself

    def fetch(self, grid: ChipGrid, when: _dt.datetime, bands: Sequence[str]) -> Tuple[Dict[str, np.ndarray], str]:
        """``({band: array}, item id)`` for one chip.

        Raises:
            FetchError: no item in the window, an asset missing, or a search or read that kept failing.
        """
        items = self.search(grid, when)
        item = choose_item(items, grid, when, self.window_s)
        if item is None:
            raise FetchError("no %s item covers the chip within %.0f s of %s (%d searched)"
                             % (self.collection, self.window_s, _iso(when), len(items)))
        out = {}
        for band in bands:
            out[band] = self.read(self.href(item, band), band, grid)
        return out, str(getattr(item, "id", ""))


def _sign(pc: Any, href: str) -> str:
    signer = getattr(pc, "sign_url", None) or pc.sign  # sign(str) signs a URL in every version
    return signer(href)


def _open_client(url: str, timeout_s: float) -> Any:
    """``pystac_client.Client.open`` with a timeout on every request, in any version: >= 0.7 take ``timeout``;
    older ones set none (a hung server would hang the search), so their session gets an adapter that fills it in,
    mounted before the root document is read."""
    from pystac_client import Client

    try:
        return Client.open(url, timeout=timeout_s)
    except TypeError:
        pass
    from pystac_client.stac_api_io import StacApiIO
    from requests.adapters import HTTPAdapter

    class TimeoutAdapter(HTTPAdapter):
        def send(self, request: Any, **kwargs: Any) -> Any:
            if kwargs.get("timeout") is None:
                kwargs["timeout"] = timeout_s
            return super(TimeoutAdapter, self).send(request, **kwargs)

    io = StacApiIO()
    for prefix in ("http://", "https://"):
        io.session.mount(prefix, TimeoutAdapter())
    client = Client.from_file(url, stac_io=io)
    if "conformsTo" not in client.extra_fields and client.get_links("search"):  # as Client.open does
        client._stac_io.set_conformance(None)
    return client


def run_with_budget(fn: Any, budget_s: float) -> Any:
    """``fn()`` on a daemon thread, given up after ``budget_s`` seconds (raises ``FetchError``); a hung server
    then costs one abandoned thread, not the run."""
    box = {}  # type: Dict[str, Any]
    done = threading.Event()

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=target, name="stac-fetch", daemon=True).start()
    if not done.wait(budget_s):
        raise FetchError("gave up after the time budget of %.0f s" % budget_s)
    if "error" in box:
        raise box["error"]
    return box["value"]
