"""A real STAC API on 127.0.0.1 for tests and benchmarks: rustac's server (in-memory backend) over items made from
chips, and their cloud-optimised GeoTIFF assets served over HTTP with range requests (uvicorn + Starlette), with
faults injected by file name. Used by tests/test_stac.py and experiments/bench_stac.py; needs the dev extra
(rustac, uvicorn, starlette).

The catalogue mimics the Planetary Computer's ``sentinel-2-l2a``: one item per acquisition and tile, geometry in
lon/lat, one COG per band asset, each asset a tile larger than the chip (so the chip's window has to be found
in it) on the chip's 10 m grid. Each supplementary band is a known function of the chip's own pixels
(``expected_band``), so what add-bands or main.py fetched can be checked pixel by pixel.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import requests


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on at ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


PAD = 96  # pixels of the tile around the chip on each side
COLLECTION = "sentinel-2-l2a"

# Run with `python -c`: static files with range requests; a file whose name holds "fail500" answers 500, one
# whose name holds "hang" answers only after 120 s (a server that stops responding).
_FILE_SERVER = r'''
import asyncio, sys
import uvicorn
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

root, port = sys.argv[1], int(sys.argv[2])
files = StaticFiles(directory=root)

async def app(scope, receive, send):
    path = scope.get("path", "")
    if "fail500" in path:
        await PlainTextResponse("injected failure", status_code=500)(scope, receive, send)
        return
    if "hang" in path:
        await asyncio.sleep(120)
    await files(scope, receive, send)

uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
'''


# Run with `python -c`: the Planetary Computer's two services as a client meets them, on 127.0.0.1.
# - The SAS token API: GET <url>/api/sas/v1/token/<account>/<container> answers {"msft:expiry", "token"}, a
#   query string (st, se, sp, sig, ...) valid for that container until its expiry.
# - Azure Blob Storage at http://<account>.blob.core.windows.net/<container>/<file>: reached through this server as
#   an HTTP proxy (GDAL_HTTP_PROXY), since those names lead elsewhere. A read needs a token this server issued
#   for that container and not yet expired; anything else is refused 403 AuthenticationFailed, as Azure does.
# POST /control {"fail": [503, ...], "ttl": s} sets the status of the next token requests and the lifetime of
# the tokens issued from then on. Every token request and blob read is logged as one JSON line to argv[3].
_PC_SERVER = r'''
import datetime as dt, json, secrets, sys
from urllib.parse import parse_qs, urlsplit
import uvicorn
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.staticfiles import StaticFiles

root, port, log_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
files = StaticFiles(directory=root)
state = {"fail": [], "ttl": 3600.0}
issued = {}  # sig -> (account, container, expiry)
PREFIX = "/api/sas/v1/token/"
BLOB = ".blob.core.windows.net"

def log(**entry):
    entry["t"] = dt.datetime.now(dt.timezone.utc).timestamp()
    with open(log_path, "a") as fh:
        fh.write(json.dumps(entry) + "\n")

def iso(t):
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    path = scope["path"]
    host = dict(scope["headers"]).get(b"host", b"").decode().split(":")[0]
    if path.startswith("http://"):  # an absolute-form target, as a proxy receives it
        parts = urlsplit(path)
        host, path = parts.hostname or "", parts.path
    if path == "/control" and scope["method"] == "POST":
        state.update(await Request(scope, receive).json())
        await JSONResponse(state)(scope, receive, send)
    elif path.startswith(PREFIX):
        account, container = path[len(PREFIX):].split("/")[:2]
        status = state["fail"].pop(0) if state["fail"] else 200
        log(kind="token", account=account, container=container, status=status)
        if status != 200:
            await PlainTextResponse("injected failure", status_code=status)(scope, receive, send)
            return
        now = dt.datetime.now(dt.timezone.utc)
        expiry = now + dt.timedelta(seconds=float(state["ttl"]))
        sig = secrets.token_urlsafe(16)
        issued[sig] = (account, container, expiry)
        token = "st=%s&se=%s&sp=rl&sv=2021-06-08&sr=c&skoid=local&sig=%s" % (iso(now), iso(expiry), sig)
        await JSONResponse({"msft:expiry": iso(expiry), "token": token})(scope, receive, send)
    elif host.endswith(BLOB):
        account = host[: -len(BLOB)]
        container, _, name = path.lstrip("/").partition("/")
        sig = parse_qs(scope["query_string"].decode()).get("sig", [""])[0]
        grant = issued.get(sig)
        now = dt.datetime.now(dt.timezone.utc)
        ok = grant is not None and grant[:2] == (account, container) and grant[2] > now
        log(kind="blob", account=account, container=container, name=name, sig=sig, method=scope["method"],
            status=200 if ok else 403)
        if not ok:
            await PlainTextResponse("AuthenticationFailed", status_code=403)(scope, receive, send)
            return
        await files(dict(scope, path="/" + name, raw_path=("/" + name).encode(), query_string=b""), receive, send)
    else:
        await PlainTextResponse("not found", status_code=404)(scope, receive, send)

uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
'''


def expected_band(band: str, image: np.ndarray, label: np.ndarray | None = None) -> np.ndarray:
    """The value each fixture asset has over the chip: B11 = B08 // 2 + 7 (uint16), SCL = 8 where B02 > 3000
    (bright: cloud) else 4 (uint8)."""
    if band == "B11":
        return (image[3] // 2 + 7).astype(np.uint16)
    if band == "SCL":
        return np.where(image[0] > 3000, 8, 4).astype(np.uint8)
    raise KeyError(band)


def _wait_http(url: str, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        try:
            requests.get(url, timeout=2)
            return
        except requests.RequestException:
            time.sleep(0.2)
    raise RuntimeError(f"{what} did not answer at {url} within {timeout} s")


@dataclass
class Server:
    url: str
    proc: subprocess.Popen

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_file_server(root: Path) -> Server:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", _FILE_SERVER, str(root), str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    _wait_http(url + "/", proc, "file server")
    return Server(url, proc)


@dataclass
class PlanetaryComputer(Server):
    """The local stand-in for the Planetary Computer's token API and blob storage (see ``_PC_SERVER``)."""

    log_path: Path

    @property
    def sas_url(self) -> str:
        """What ``PC_SDK_SAS_URL`` takes (planetary-computer's setting for its token endpoint)."""
        return self.url + "/api/sas/v1/token"

    @property
    def proxy(self) -> str:
        """What ``GDAL_HTTP_PROXY`` takes, so GDAL's reads of ``*.blob.core.windows.net`` reach this server."""
        return self.url.removeprefix("http://")

    def control(self, fail: list[int] | None = None, ttl: float | None = None) -> None:
        """Fail the next token requests with these statuses; issue tokens valid for ``ttl`` seconds."""
        body = {k: v for k, v in (("fail", fail), ("ttl", ttl)) if v is not None}
        requests.post(self.url + "/control", json=body, timeout=10).raise_for_status()

    def log(self) -> list[dict]:
        """Every token request and blob read so far, in order."""
        if not self.log_path.is_file():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]


def start_planetary_computer(root: Path, log_path: Path) -> PlanetaryComputer:
    """Serve ``root``'s files as blobs (any account and container) behind the token check."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", _PC_SERVER, str(root), str(port), str(log_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    _wait_http(url + "/", proc, "Planetary Computer stand-in")
    return PlanetaryComputer(url, proc, log_path)


def rustac_binary() -> str | None:
    cand = Path(sys.executable).with_name("rustac")
    if cand.is_file():
        return str(cand)
    from shutil import which

    return which("rustac")


def start_stac_server(catalog: Path) -> Server:
    """``rustac serve`` on a free port over ``catalog/collection.json`` and ``catalog/items.json``."""
    exe = rustac_binary()
    if exe is None:
        raise RuntimeError("rustac is not installed (pip install rustac; it is in the dev extras)")
    port = free_port()
    addr = f"127.0.0.1:{port}"
    proc = subprocess.Popen([exe, "serve", "--addr", addr, str(catalog / "collection.json"),
                             str(catalog / "items.json")], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    url = f"http://{addr}"
    _wait_http(url + "/", proc, "rustac serve")
    deadline = time.time() + 30  # the items load after the socket opens
    while time.time() < deadline:
        r = requests.get(f"{url}/collections/{COLLECTION}/items", timeout=5)
        if r.ok and r.json().get("features"):
            return Server(url, proc)
        time.sleep(0.2)
    raise RuntimeError(f"rustac serve at {url} serves no items of {COLLECTION}")


def _footprint(crs, transform, width: int, height: int) -> dict:
    from rasterio.warp import transform as warp_points

    xs, ys = [], []
    for px, py in ((0, 0), (width, 0), (width, height), (0, height), (0, 0)):
        x, y = transform * (px, py)
        xs.append(x)
        ys.append(y)
    lons, lats = warp_points(crs, "EPSG:4326", xs, ys)
    return {"type": "Polygon", "coordinates": [[[float(a), float(b)] for a, b in zip(lons, lats)]]}


def write_cog(path: Path, array: np.ndarray, crs, transform) -> None:
    import rasterio

    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="COG", height=array.shape[0], width=array.shape[1], count=1,
                       dtype=array.dtype.name, crs=crs, transform=transform, compress="deflate",
                       blocksize=256) as dst:
        dst.write(array, 1)


def build_catalog(root: Path, splits: tuple[str, ...], out: Path, base_url: str, bands=("B11", "SCL"),
                  no_item: tuple[str, ...] = (), fail: tuple[str, ...] = (), hang: tuple[str, ...] = (),
                  decoys: bool = True) -> dict[str, dict[str, np.ndarray]]:
    """Items and COGs for every chip of ``root``'s ``splits``; returns {chip: {band: expected 512 x 512}}.

    Per chip: an item at the chip's datetime whose tile (the chip plus ``PAD`` pixels around it) covers the chip,
    with one COG per band. Decoys (where ``decoys``): a neighbouring tile of the same acquisition that covers only
    part of the chip, and the same tile ten days later, both with wrong pixels. ``no_item`` chips get no item;
    ``fail`` chips' assets answer HTTP 500 and ``hang`` chips' assets never answer.
    """
    import pandas as pd
    import rasterio
    from affine import Affine

    from cloudseg.data.io import features_dir, metadata_path, read_chip

    rows = [(split, row) for split in splits for row in pd.read_csv(metadata_path(root, split), dtype=str).itertuples()]
    items, expected = [], {}
    for split, row in rows:
        chip = row.chip_id
        folder = features_dir(root, split) / chip
        image = read_chip(folder)
        expected[chip] = {b: expected_band(b, image) for b in bands}
        if chip in no_item:
            continue
        with rasterio.open(folder / "B02.tif") as src:
            crs, tr = src.crs, src.transform
        size = 512 + 2 * PAD
        tile_tr = tr * Affine.translation(-PAD, -PAD)
        tag = "fail500_" if chip in fail else "hang_" if chip in hang else ""

        def tile_item(item_id: str, when: str, transform, fill: int | None) -> dict:
            assets = {}
            for b, exp in expected[chip].items():
                arr = np.full((size, size), 1 if fill is None else fill, dtype=exp.dtype)
                if fill is None:
                    arr[PAD:PAD + 512, PAD:PAD + 512] = exp
                name = f"{tag}{item_id}_{b}.tif"
                write_cog(out / "assets" / name, arr, crs, transform)
                assets[b] = {"href": f"{base_url}/{name}", "type": "image/tiff; application=geotiff; "
                             "profile=cloud-optimized", "roles": ["data"]}
            geom = _footprint(crs, transform, size, size)
            lons = [p[0] for p in geom["coordinates"][0]]
            lats = [p[1] for p in geom["coordinates"][0]]
            return {"type": "Feature", "stac_version": "1.0.0", "id": item_id, "collection": COLLECTION,
                    "geometry": geom, "bbox": [min(lons), min(lats), max(lons), max(lats)],
                    "properties": {"datetime": when, "proj:epsg": crs.to_epsg()}, "assets": assets, "links": []}

        when = pd.Timestamp(row.datetime)
        iso = when.strftime("%Y-%m-%dT%H:%M:%SZ")
        items.append(tile_item(f"S2_{chip}", iso, tile_tr, None))
        if decoys:  # same acquisition, the neighbouring tile: covers the chip's right half only
            items.append(tile_item(f"S2_{chip}_east", iso, tr * Affine.translation(256, -PAD), 199))
            later = (when + pd.Timedelta(days=10)).strftime("%Y-%m-%dT%H:%M:%SZ")
            items.append(tile_item(f"S2_{chip}_later", later, tile_tr, 155))
    lons = [c for it in items for c in it["bbox"][0::2]] or [0.0]
    lats = [c for it in items for c in it["bbox"][1::2]] or [0.0]
    collection = {
        "type": "Collection", "stac_version": "1.0.0", "id": COLLECTION, "description": "test fixture",
        "license": "proprietary", "links": [],
        "extent": {"spatial": {"bbox": [[min(lons), min(lats), max(lons), max(lats)]]},
                   "temporal": {"interval": [[None, None]]}},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "collection.json").write_text(json.dumps(collection))
    (out / "items.json").write_text(json.dumps({"type": "FeatureCollection", "features": items}))
    return expected


def write_chips(root: Path, n: int, split: str = "test", locations: tuple[str, ...] = ("A", "B", "C", "D"),
                seed: int = 0) -> Path:
    """``n`` chips of random reflectance in the competition layout, without labels: ``<split>_features/<id>/`` with
    the four bands and ``<split>_metadata.csv`` with a location and a datetime per chip. All share one 10 m grid
    (``spread_chips`` moves them apart). Returns ``root``."""
    import pandas as pd

    from cloudseg.data.io import BANDS, write_tif

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        chip = f"{split[:2]}{i:02d}"
        for band in BANDS:
            write_tif(root / f"{split}_features" / chip / f"{band}.tif",
                      rng.integers(300, 9000, (512, 512), dtype=np.uint16))
        rows.append((chip, locations[i % len(locations)], f"2020-0{1 + i % 9}-01T10:00:00Z",
                     f"az://./{split}_features/{chip}"))
    pd.DataFrame(rows, columns=["chip_id", "location", "datetime", "cloudpath"]).to_csv(
        root / f"{split}_metadata.csv", index=False)
    return root


def spread_chips(root: Path, split: str = "train", row: int = 0) -> None:
    """Move each fixture chip to its own place on the map (fixture chips share one transform): chip k's bands
    and label are rewritten 10,240 m east of chip k-1's, and ``row`` x 20,480 m south."""
    import rasterio
    from affine import Affine

    from cloudseg.data.io import features_dir, labels_dir

    for k, folder in enumerate(sorted(p for p in features_dir(root, split).iterdir() if p.is_dir())):
        files = sorted(folder.glob("*.tif"))
        label = labels_dir(root, split) / f"{folder.name}.tif"
        files += [label] if label.is_file() else []
        for f in files:
            with rasterio.open(f) as src:
                arr, profile = src.read(1), src.profile
            profile["transform"] = profile["transform"] * Affine.translation(1024 * k, 2048 * row)
            with rasterio.open(f, "w", **profile) as dst:
                dst.write(arr, 1)
    os.sync()
