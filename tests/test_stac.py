"""Supplementary bands from a STAC API: ``cloudseg add-bands``, config key ``bands``, and main.py fetching them.

Against a real STAC API on 127.0.0.1 (``rustac serve``) whose items' COG assets are served over HTTP with range
requests (experiments/stac_local.py). Each asset is a known function of the chip's pixels, so the fetched bands are
checked pixel by pixel; decoy items (a neighbouring tile of the same acquisition, the same tile ten days later)
carry wrong pixels, so choosing one shows.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from cloudseg.data.io import features_dir, read_band, write_tif
from cloudseg.data.validate import DatasetError, validate_split
from cloudseg.paths import REPO_ROOT
from cloudseg.submission import stac_bands
from tests.data.fixtures import make_dataset
from tests.needs import runtime_python
from tests.services import unavailable

sys.path.insert(0, str(REPO_ROOT / "experiments"))
from stac_local import (  # noqa: E402  (the local STAC API, shared with experiments/bench_stac.py)
    build_catalog,
    rustac_binary,
    spread_chips,
    start_file_server,
    start_planetary_computer,
    start_stac_server,
)

CLI = [sys.executable, "-m", "cloudseg.cli"]
NO_ITEM, FAIL, HANG = "tr01", "tr02", "tr03"


@pytest.fixture(scope="module")
def stac(tmp_path_factory):
    """6 train chips and 3 test chips, each at its own place; a STAC API with an item per chip (decoys around),
    except tr01 and te02 (no item); tr02's assets answer 500 and tr03's never answer."""
    if rustac_binary() is None:
        unavailable("rustac is not installed (it is in the dev extras)")
    base = tmp_path_factory.mktemp("stac")
    data = make_dataset(base / "data", n_chips=6)
    make_dataset(data, n_chips=3, split="test", labels=False, seed=1)
    spread_chips(data, "train")
    spread_chips(data, "test", row=1)
    catalog = base / "catalog"
    (catalog / "assets").mkdir(parents=True)
    files = start_file_server(catalog / "assets")
    servers = [files]
    try:
        expected = build_catalog(data, ("train", "test"), catalog, files.url, no_item=(NO_ITEM, "te02"),
                                 fail=(FAIL,), hang=(HANG,))
        api = start_stac_server(catalog)
        servers.append(api)
        yield SimpleNamespace(data=data, url=api.url, expected=expected, base=base)
    finally:
        for s in servers:
            s.stop()


def _copy(data: Path, dst: Path) -> Path:
    shutil.copytree(data, dst)
    return dst


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})


@pytest.mark.stac
def test_add_bands_writes_each_chips_window_and_lists_the_failures(stac, tmp_path):
    data = _copy(stac.data, tmp_path / "data")
    proc = _cli("add-bands", "--data", str(data), "--bands", "B11,SCL", "--stac", stac.url, "--workers", "4",
                "--timeout", "2")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = data / "add_bands_train_failed.csv"
    assert f"3 chip(s) got no B11,SCL: listed with the reason in {report}" in proc.stderr
    assert "train: 3 chips written, 0 already complete, 3 failed" in proc.stdout
    rows = {r["chip_id"]: r["reason"] for r in csv.DictReader(report.open())}
    assert set(rows) == {NO_ITEM, FAIL, HANG}
    assert "no sentinel-2-l2a item covers the chip" in rows[NO_ITEM]
    assert "500" in rows[FAIL]
    assert "timed out" in rows[HANG].lower() or "timeout" in rows[HANG].lower(), rows[HANG]

    feats = features_dir(data, "train")
    written = {}
    for chip in ("tr00", "tr04", "tr05"):
        for band in ("B11", "SCL"):
            got = read_band(feats / chip / f"{band}.tif")
            want = stac.expected[chip][band]
            assert got.dtype == want.dtype, (chip, band, got.dtype)
            np.testing.assert_array_equal(got, want, err_msg=f"{chip}/{band}")  # not a decoy's pixels
        import rasterio

        with rasterio.open(feats / chip / "B11.tif") as b11, rasterio.open(feats / chip / "B02.tif") as b02:
            assert (b11.crs, b11.transform) == (b02.crs, b02.transform)  # the chip's own georeferencing
        written[chip] = (feats / chip / "B11.tif").stat().st_mtime_ns
    for chip in (NO_ITEM, FAIL, HANG):
        assert not list((feats / chip).glob("B11*")) and not list((feats / chip).glob("SCL*"))
    record = json.loads((data / "add_bands.json").read_text())
    assert record["train"]["B11"]["stac"] == stac.url and record["train"]["SCL"]["chips_failed"] == 3

    # resumable: the three written chips are skipped (files untouched), the failed ones tried again
    again = _cli("add-bands", "--data", str(data), "--bands", "B11,SCL", "--stac", stac.url, "--timeout", "2")
    assert again.returncode == 1
    assert "train: 0 chips written, 3 already complete, 3 failed" in again.stdout
    assert {c: (feats / c / "B11.tif").stat().st_mtime_ns for c in written} == written

    # config key bands: validation names the chips that lack a band and the command that fetches it
    with pytest.raises(DatasetError) as err:
        validate_split(data, "train", deep=False, bands=("B02", "B03", "B04", "B08", "B11"))
    assert f"{feats / NO_ITEM / 'B11.tif'}: file is missing" in str(err.value)
    assert "3 chip(s) lack supplementary band(s) B11: `cloudseg add-bands" in str(err.value)


@pytest.mark.stac
def test_add_bands_refuses_bad_arguments(stac, tmp_path):
    data = _copy(stac.data, tmp_path / "data")
    proc = _cli("add-bands", "--data", str(data), "--bands", "B08,B11", "--stac", stac.url)
    assert proc.returncode == 2 and "['B08'] are already in every chip" in proc.stderr
    proc = _cli("add-bands", "--data", str(tmp_path / "nowhere"), "--bands", "B11", "--stac", stac.url)
    assert proc.returncode == 2 and "train_features: features folder is missing" in proc.stderr


def test_the_item_chosen_is_the_nearest_acquisition_then_the_covering_tile():
    grid = stac_bands.ChipGrid(None, None, 512, 512, (0.0, 0.0, 1.0, 1.0),
                               [(x, y) for y in (0.0, 0.5, 1.0) for x in (0.0, 0.5, 1.0)])

    def square(x0, y0, x1, y1):
        return {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}

    when = dt.datetime(2020, 4, 29, 8, 20, 47, tzinfo=dt.timezone.utc)
    item = lambda i, t, g: SimpleNamespace(id=i, datetime=t, geometry=g, properties={})  # noqa: E731
    half = item("half", when, square(0.4, -1, 2, 2))  # the neighbouring tile: right part of the chip only
    full = item("full", when, square(-1, -1, 2, 2))
    later = item("later", when + dt.timedelta(days=10), square(-1, -1, 2, 2))
    away = item("away", when, square(5, 5, 6, 6))
    assert stac_bands.choose_item([half, later, full, away], grid, when).id == "full"
    assert stac_bands.choose_item([half, later], grid, when).id == "half"
    assert stac_bands.choose_item([later, away], grid, when) is None
    assert stac_bands.coverage(square(0.4, -1, 2, 2), grid.points) == pytest.approx(6 / 9)
    holed = {"type": "Polygon", "coordinates": [square(-1, -1, 2, 2)["coordinates"][0],
                                                square(0.25, 0.25, 0.75, 0.75)["coordinates"][0]]}
    assert stac_bands.coverage(holed, grid.points) == pytest.approx(8 / 9)
    assert stac_bands.parse_time("2020-04-29T08:20:47Z") == when
    with pytest.raises(stac_bands.FetchError, match="not ISO 8601"):
        stac_bands.parse_time("29/04/2020")


def test_supplementary_band_statistics_come_from_the_training_chips(tiny_copy):
    from cloudseg.data.transforms import fit_normalization

    feats = features_dir(tiny_copy, "train")
    for k, chip in enumerate(sorted(p.name for p in feats.iterdir())):
        write_tif(feats / chip / "SCL.tif", np.full((512, 512), 2 + 2 * k, dtype=np.uint8))  # 2, 4, 6, 8
    bands = ("B02", "B03", "B04", "B08", "SCL")
    split = validate_split(tiny_copy, "train", load=True, bands=bands)
    assert split.images["tr00"].shape == (5, 512, 512) and split.images["tr00"].dtype == np.uint16
    norm = fit_normalization(split, ["tr00", "tr01"], bands, bands[:4])  # 2 and 4: mean 3, sd 1 (x 1e-4)
    assert norm.mean[:4] == (0.0,) * 4 and norm.std[:4] == (1.0,) * 4
    assert norm.mean[4] == pytest.approx(3e-4) and norm.std[4] == pytest.approx(1e-4)
    x = norm(split.images["tr01"])
    assert x[4].mean() == pytest.approx(1.0, abs=1e-3)  # (4e-4 - 3e-4) / 1e-4
    np.testing.assert_allclose(x[:4], np.clip(split.images["tr01"][:4] / 1e4, 0, 2), rtol=1e-6)


def _five_band_data(stac, dst: Path) -> Path:
    """The fixture's train chips with B11 written locally (the formula the server's assets follow)."""
    data = _copy(stac.data, dst)
    feats = features_dir(data, "train")
    for chip in sorted(p.name for p in feats.iterdir()):
        write_tif(feats / chip / "B11.tif", stac.expected[chip]["B11"])
    return data


@pytest.mark.stac
@pytest.mark.slow
def test_a_five_band_model_trains_promotes_and_its_main_py_fetches_b11(stac, tmp_path, mlflow_tmp, monkeypatch):
    data = _five_band_data(stac, tmp_path / "data")
    env = {**os.environ, "CLOUDSEG_STATE_ROOT": str(tmp_path / "state"), "HF_HUB_OFFLINE": "1",
           "CLOUDSEG_CACHE": str(tmp_path / "cache")}
    train = subprocess.run(
        [sys.executable, str(REPO_ROOT / "experiments" / "train.py"), "--data", str(data),
         "--set", "bands=B02,B03,B04,B08,B11", "--set", "encoder=resnet18", "--set", "epochs=1",
         "--set", "batch_size=2", "--set", "crop_size=64", "--set", "n_folds=3", "--set", "val_batch_size=2",
         "--set", "plot_chips=0", "--set", "experiment=five"], capture_output=True, text=True, env=env, timeout=600)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    assert "bands B02,B03,B04,B08,B11" in train.stdout
    run_id = [ln.split("=", 1)[1] for ln in train.stdout.splitlines() if ln.startswith("run_id=")][-1]

    out = tmp_path / "submissions"
    monkeypatch.setattr("cloudseg.tracking.promote.SUBMISSIONS_DIR", out)
    from cloudseg.tracking import promote

    assert promote.main(["--run-id", run_id, "--name", "five", "--no-register", "--stac", stac.url,
                         "--tta", "none"]) == 0
    folder = out / "five"
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    assert manifest["network"]["stac"] == stac.url and manifest["network"]["bands"] == ["B11"]
    assert manifest["members"][0]["bands"] == ["B02", "B03", "B04", "B08", "B11"]
    assert (folder / "stac_bands.py").is_file() and "stac_bands.py" in manifest["sha256"]
    inference = json.loads((folder / "assets" / "inference.json").read_text())
    assert inference["stac"]["url"] == stac.url

    # the test chips have only the four bands; te02 has no item on the server (fallback: the training mean)
    def root_with(features_from: Path, name: str) -> Path:
        root = tmp_path / name
        shutil.copytree(features_dir(features_from, "test"), root / "data" / "test_features")
        shutil.copyfile(features_from / "test_metadata.csv", root / "data" / "test_metadata.csv")
        return root

    python = str(runtime_python())  # skips naming `make runtime-env` where it is not built; fails under CI=true
    fetched = root_with(data, "fetched")
    proc = subprocess.run([python, "main.py"], cwd=folder, capture_output=True, text=True, timeout=600,
                          env={"PATH": os.environ["PATH"], "CLOUDSEG_ROOT": str(fetched), "HOME": str(tmp_path)})
    log = proc.stdout
    assert proc.returncode == 0, log[-3000:] + proc.stderr[-3000:]
    assert "torch=1.8" in log and f"stac url={stac.url} collection=sentinel-2-l2a bands=B11" in log
    assert "stac fetched=2 fallback=1" in log and "stac fallback chips (1): te02" in log
    assert any(ln.startswith("ERROR chip=te02 ") and "filled with the training mean" in ln for ln in log.splitlines())
    assert sorted(os.listdir(fetched / "predictions")) == ["te00.tif", "te01.tif", "te02.tif"]

    # the same chips with B11 on disk (as add-bands writes it): the fetched pixels gave the same predictions
    local = root_with(data, "local")
    for chip in ("te00", "te01"):
        write_tif(local / "data" / "test_features" / chip / "B11.tif", stac.expected[chip]["B11"])
    shutil.rmtree(local / "data" / "test_features" / "te02")
    proc2 = subprocess.run([python, "main.py"], cwd=folder, capture_output=True, text=True, timeout=600,
                           env={"PATH": os.environ["PATH"], "CLOUDSEG_ROOT": str(local), "HOME": str(tmp_path),
                                "CLOUDSEG_STAC_URL": "http://127.0.0.1:9"})  # nothing listens: no fetch needed
    assert proc2.returncode == 0, proc2.stdout[-3000:]
    assert "stac fetched=0 fallback=0" in proc2.stdout
    for chip in ("te00", "te01"):
        np.testing.assert_array_equal(read_band(fetched / "predictions" / f"{chip}.tif"),
                                      read_band(local / "predictions" / f"{chip}.tif"))

    # verify-submission runs it without network: every chip takes the fallback, and the format checks pass
    from cloudseg.submission.verify import verify_submission

    lines: list[str] = []
    result = verify_submission(out / "five.zip", features_dir(data, "test"), python=python, echo=lines.append,
                               allow_network_check_skip=True, timeout=600)
    assert result.ok, result.failures
    assert any(f"this submission fetches bands B11 from {stac.url} (allowed: 127.0.0.1)" in ln for ln in lines)
    proxied = any("through an allow-listing proxy" in ln for ln in lines)  # root: a door out of the namespace
    no_route = not proxied and "NOT isolated" not in result.network  # a namespace without one: the fallback
    assert any(("stac fetched=0 fallback=3" if no_route else "stac fetched=2 fallback=1") in ln for ln in lines)
    if proxied:
        assert any(ln.startswith("network: ") and "refused" in ln and ", 0 refused" in ln for ln in lines), lines


def test_main_py_stops_fetching_after_chips_fail_in_a_row(tmp_path):
    """An unreachable API costs a few chips' timeouts, not every chip's: after max_failures_in_row failures the
    rest take the fallback at once, each chip still gets its band (the training mean) and a reason."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("main_under_test", REPO_ROOT / "cloudseg" / "submission" / "main.py")
    main = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(main)
    lines: list[str] = []
    main.log = lines.append
    data = make_dataset(tmp_path / "d", n_chips=4, split="test", labels=False)
    sup = main.Supplement(["B11"], {"B11": 1234.0}, {"url": "http://127.0.0.1:9", "max_failures_in_row": 2,
                                                     "timeout_s": 1, "retries": 0}, data / "test_metadata.csv")
    out = []
    for chip in ("te00", "te01", "te02", "te03"):
        problems: list[str] = []
        bands = sup.get(data / "test_features" / chip, ["B11"], problems)
        assert bands["B11"].shape == (512, 512) and (bands["B11"] == 1234.0).all()
        out.append(problems[0])
    assert all("filled with the training mean (fallback)" in p for p in out)
    assert "STAC given up: 2 chips in a row failed" in out[2] and "STAC given up" in out[3]
    assert "STAC given up" not in out[0] + out[1]
    assert sum("ERROR STAC given up" in ln for ln in lines) == 1
    sup.report()
    assert "stac fetched=0 fallback=4" in lines[-2]
    assert lines[-1] == "stac fallback chips (4): te00 te01 te02 te03"


def test_the_network_guard_lets_through_only_the_declared_endpoint(tmp_path):
    from cloudseg.submission.verify import NETWORK_MARK, write_network_guard

    guard = write_network_guard(tmp_path / "guard")
    code = ("import socket\n"
            "socket.getaddrinfo('127.0.0.1', 80)\n"
            "try:\n    socket.getaddrinfo('example.com', 443)\nexcept PermissionError as e:\n    print('refused', e)\n"
            "try:\n    socket.create_connection(('10.1.2.3', 80), timeout=1)\nexcept PermissionError as e:\n"
            "    print('refused', e)\n")
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(guard), "CLOUDSEG_NETWORK_ALLOW": "127.0.0.1,stac.local"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    refused = [ln for ln in out.stdout.splitlines() if ln.startswith("refused")]
    assert len(refused) == 2 and all(NETWORK_MARK in ln for ln in refused), out.stdout
    assert "'example.com'" in refused[0] and "10.1.2.3" in refused[1]


def test_the_verify_proxy_passes_only_allowed_hosts(tmp_path):
    import http.server
    import socket
    import threading

    from cloudseg.submission.netproxy import AllowProxy, host_allowed

    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = f"hello {self.path}".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    port = srv.server_address[1]
    proxy = AllowProxy(tmp_path / "p.sock", ["127.0.0.1", "*.blob.core.windows.net"], "MARK")

    def ask(request: str) -> bytes:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(proxy.path))
            s.sendall(request.encode())
            out = b""
            while chunk := s.recv(65536):
                out += chunk
            return out

    try:
        ok = ask(f"GET http://127.0.0.1:{port}/a?b=1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                 "Proxy-Connection: keep-alive\r\n\r\n")
        assert ok.startswith(b"HTTP/1.0 200") and ok.endswith(b"hello /a?b=1"), ok
        assert ask(f"GET http://localhost:{port}/a HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 403")
        assert ask("CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n").startswith(b"HTTP/1.1 403")
        assert proxy.refused == [f"MARK proxy refused localhost:{port} (not the declared STAC endpoint)",
                                 "MARK proxy refused example.com:443 (not the declared STAC endpoint)"]
        assert host_allowed("sentinel2l2a01.blob.core.windows.net", proxy.allowed)
        assert not host_allowed("blob.core.windows.net.evil.com", proxy.allowed)
    finally:
        proxy.close()
        srv.shutdown()


# ------------------------------------------------------------------------------------------ Planetary Computer

ACCOUNT, CONTAINER = "cloudsegtest", "sentinel2-l2"


@pytest.fixture(scope="module")
def signed_stac(tmp_path_factory):
    """4 train chips whose items' assets are blobs (``http://<account>.blob.core.windows.net/<container>/...``)
    that only a token from the signing API opens: the local stand-in of experiments/stac_local.py."""
    if rustac_binary() is None:
        unavailable("rustac is not installed (it is in the dev extras)")
    base = tmp_path_factory.mktemp("signed")
    data = make_dataset(base / "data", n_chips=4)
    spread_chips(data, "train")
    catalog = base / "catalog"
    (catalog / "assets").mkdir(parents=True)
    pc = start_planetary_computer(catalog / "assets", base / "pc.jsonl")
    servers = [pc]
    try:
        expected = build_catalog(data, ("train",), catalog, f"http://{ACCOUNT}.blob.core.windows.net/{CONTAINER}",
                                 bands=("B11",), decoys=False)
        servers.append(start_stac_server(catalog))
        times = {r["chip_id"]: r["datetime"] for r in csv.DictReader((data / "train_metadata.csv").open())}
        b02 = {c: features_dir(data, "train") / c / "B02.tif" for c in times}
        chips = {c: (stac_bands.chip_grid(b02[c]), stac_bands.parse_time(t)) for c, t in times.items()}
        yield SimpleNamespace(url=servers[1].url, pc=pc, expected=expected, chips=chips, times=times, b02=b02)
    finally:
        for s in servers:
            s.stop()


def _since(pc, n: int, kind: str) -> list[dict]:
    return [e for e in pc.log()[n:] if e["kind"] == kind]


@pytest.mark.stac
def test_planetary_computer_signing_reuses_refreshes_and_retries_tokens(signed_stac, monkeypatch):
    """The signing path of the band fetch (planetary-computer's sign_url, as main.py and add-bands use it against the
    Planetary Computer) against a local token API and blob store that behave like the real ones: unsigned reads are
    refused; a token request that fails once is retried; one token serves every read of its container until less
    than a minute of it is left, then a new one is asked for; a token API that keeps refusing fails the chip with
    the reason, after the retries."""
    import planetary_computer.sas as sas
    from planetary_computer.settings import Settings

    s, pc = signed_stac, signed_stac.pc
    monkeypatch.setenv("PC_SDK_SAS_URL", pc.sas_url)  # planetary-computer's own setting for its token endpoint
    monkeypatch.delenv("PC_SDK_SUBSCRIPTION_KEY", raising=False)
    monkeypatch.setenv("GDAL_HTTP_PROXY", pc.proxy)  # the blob host names reach the stand-in
    Settings.get.cache_clear()
    sas.TOKEN_CACHE.clear()
    try:
        n = len(pc.log())
        with pytest.raises(stac_bands.FetchError, match="403"):
            stac_bands.StacBands(s.url, sign=False, retries=0).fetch(*s.chips["tr00"], ["B11"])
        assert [e["status"] for e in _since(pc, n, "blob")][:1] == [403] and not _since(pc, n, "token")

        fetcher = stac_bands.StacBands(s.url, sign=True)
        pc.control(fail=[503], ttl=70)  # the first token request fails; tokens live 70 s
        n = len(pc.log())
        got, item = fetcher.fetch(*s.chips["tr00"], ["B11"])
        assert item == "S2_tr00"
        np.testing.assert_array_equal(got["B11"], s.expected["tr00"]["B11"])
        tokens = _since(pc, n, "token")
        assert [(t["status"], t["account"], t["container"]) for t in tokens] == [
            (503, ACCOUNT, CONTAINER), (200, ACCOUNT, CONTAINER)]
        first = {b["sig"] for b in _since(pc, n, "blob")}
        assert len(first) == 1 and "" not in first  # every read carried the one token issued

        n = len(pc.log())  # 10 s of the token's 70 are spare before the one-minute margin: it is reused
        got, _ = fetcher.fetch(*s.chips["tr01"], ["B11"])
        np.testing.assert_array_equal(got["B11"], s.expected["tr01"]["B11"])
        assert not _since(pc, n, "token") and {b["sig"] for b in _since(pc, n, "blob")} == first

        time.sleep(max(0.0, tokens[-1]["t"] + 10.5 - time.time()))  # less than a minute left: refreshed
        n = len(pc.log())
        got, _ = fetcher.fetch(*s.chips["tr02"], ["B11"])
        np.testing.assert_array_equal(got["B11"], s.expected["tr02"]["B11"])
        assert [t["status"] for t in _since(pc, n, "token")] == [200]
        second = {b["sig"] for b in _since(pc, n, "blob")}
        assert len(second) == 1 and second != first
        assert all(b["status"] == 200 for b in pc.log() if b["kind"] == "blob" and b["sig"])  # none expired

        pc.control(fail=[403, 403, 403], ttl=70)  # the token API keeps refusing (rate limit, bad key)
        sas.TOKEN_CACHE.clear()
        n = len(pc.log())
        with pytest.raises(stac_bands.FetchError, match="signing http://cloudsegtest.blob.core.windows.net/.* "
                                                        "failed after 3 attempt"):
            fetcher.fetch(*s.chips["tr03"], ["B11"])
        assert [t["status"] for t in _since(pc, n, "token")] == [403, 403, 403] and not _since(pc, n, "blob")
    finally:
        Settings.get.cache_clear()
        sas.TOKEN_CACHE.clear()


@pytest.mark.stac
@pytest.mark.runtime
def test_runtime_planetary_computer_signs_and_retries(signed_stac, tmp_path):
    """The same path under the runtime's planetary-computer 0.4.2 (stac_bands.py as main.py ships it), which has no
    retry of its own: a token request that fails once is retried by stac_bands, and the signed read gets the
    chip's pixels."""
    python = runtime_python()
    s, pc = signed_stac, signed_stac.pc
    code = ("import sys, numpy as np\n"
            "sys.path.insert(0, sys.argv[1])\n"
            "import planetary_computer, stac_bands\n"
            "grid = stac_bands.chip_grid(sys.argv[2])\n"
            "bands, item = stac_bands.StacBands(sys.argv[3], sign=True).fetch(\n"
            "    grid, stac_bands.parse_time(sys.argv[4]), ['B11'])\n"
            "np.save(sys.argv[5], bands['B11'])\n"
            "from planetary_computer.version import __version__\n"
            "print(__version__, item)\n")
    pc.control(fail=[503], ttl=3600)
    n = len(pc.log())
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PC_SDK_SAS_URL": pc.sas_url,
           "GDAL_HTTP_PROXY": pc.proxy}
    out = subprocess.run([str(python), "-c", code, str(REPO_ROOT / "cloudseg" / "submission"),
                          str(s.b02["tr00"]), s.url, s.times["tr00"], str(tmp_path / "b11.npy")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert out.stdout.split() == ["0.4.2", "S2_tr00"]
    np.testing.assert_array_equal(np.load(tmp_path / "b11.npy"), s.expected["tr00"]["B11"])
    assert [t["status"] for t in _since(pc, n, "token")] == [503, 200]
    assert {b["status"] for b in _since(pc, n, "blob")} == {200} and "" not in {b["sig"] for b in _since(pc, n, "blob")}
