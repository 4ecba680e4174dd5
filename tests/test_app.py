"""`sonodistill app`: the page driven in a real headless Chromium (Debian's chromium and
chromedriver, which `.ci/run` installs), and the upload rules checked over HTTP."""

from __future__ import annotations

import csv
import http.client
import io
import json
import os
import re
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
from conftest import BUSI, running_app

from sonodistill.deploy.app.server import AppConfig, serve
from sonodistill.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

CINE = "corpus/dicom/examples_ybr_color.dcm"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# The flags that work on these machines (closed network, root, no screen).
CHROME_FLAGS = [
    *("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"),
    *("--disable-background-networking", "--disable-component-update", "--disable-sync"),
    "--window-size=1280,900",
]


@pytest.fixture(scope="module")
def app(busi_seg_head, tmp_path_factory):
    """The app on a free port of 127.0.0.1, in a thread, with a 1 MB upload limit."""
    models = tmp_path_factory.mktemp("app_models")
    (models / "busi_r18").symlink_to(busi_seg_head)
    work = tmp_path_factory.mktemp("app_work")
    with running_app(models, work, max_upload_mb=1.0) as app:
        yield SimpleNamespace(url=app.url, work=work, state=app.state)


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def _post(app, body, name="x.png", headers=None, query="model=m0"):
    request = urllib.request.Request(
        f"{app.url}/api/sessions?{query}&name={urllib.request.quote(name)}",
        data=body,
        method="POST",
        headers={"X-Sonodistill": "1", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _wait_done(app, sid, timeout=60):
    for _ in range(int(timeout * 10)):
        with urllib.request.urlopen(f"{app.url}/api/sessions/{sid}") as response:
            info = json.loads(response.read())
        if info["status"] in ("done", "failed"):
            return info
        time.sleep(0.1)
    raise AssertionError(f"session {sid} not done: {info}")


def _close(app, sid):
    request = urllib.request.Request(
        f"{app.url}/api/sessions/{sid}", method="DELETE", headers={"X-Sonodistill": "1"}
    )
    urllib.request.urlopen(request).close()


@pytest.fixture
def sentinel_cine(shared_data, tmp_path) -> Path:
    """The real multi-frame DICOM cine with made-up patient identifiers to look for."""
    ds = pydicom.dcmread(shared_data / CINE)
    ds.PatientName = "SENTINELNAME^JANE"
    ds.PatientID = "SENTINEL-ID-7731"
    path = tmp_path / "cine.dcm"
    ds.save_as(path)
    return path


def _chrome(downloads: Path, profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        # .ci/run installs them and sets SONODISTILL_REQUIRE_BROWSER: there, a skip is a failure.
        message = "the browser test needs Debian's chromium and chromium-driver (apt-get install)"
        if os.environ.get("SONODISTILL_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROME_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.add_experimental_option(
        "prefs",
        {
            "download.default_directory": str(downloads),
            "download.prompt_for_download": False,
            "safebrowsing.enabled": False,
        },
    )
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def test_browser_plays_a_dicom_cine_with_overlay_threshold_and_csv(
    app, sentinel_cine, tmp_path, monkeypatch
):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    monkeypatch.setenv("SE_OFFLINE", "true")  # selenium must not look for drivers online
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver = _chrome(downloads, tmp_path / "profile")
    wait = WebDriverWait(driver, 60)
    text = lambda element_id: driver.find_element(By.ID, element_id).text  # noqa: E731
    try:
        driver.get(app.url)
        wait.until(lambda d: text("status") == "Choose a file.")
        assert "busi_r18" in text("model") and "PyTorch fp32" in text("backend")
        driver.find_element(By.ID, "file").send_keys(str(sentinel_cine))
        wait.until(lambda d: text("status").startswith(("Done", "Failed", "Refused")))
        assert text("status") == "Done: 30 frames of cine.dcm (dicom)."
        # The upload was deleted once decoded; the frames live in memory only.
        assert _files(app.work) == []
        wait.until(
            lambda d: re.fullmatch(r"[\d.]+ ms per frame \(model [\d.]+ ms\)", text("latency"))
        )
        assert re.match(r"[\d.]+ frames/s end to end \(model alone [\d.]+\)", text("fps"))
        assert re.fullmatch(r"\d+ / 30, t = [\d.]+ s", text("frame-info"))

        driver.find_element(By.ID, "play").click()  # pause on the current frame
        slider = driver.find_element(By.ID, "threshold")
        slider.send_keys(Keys.HOME)  # 0.05: the heart gets a (wrong) breast-lesion mask
        assert driver.find_element(By.ID, "threshold-value").text == "0.05"
        low = int(text("area").split(" px")[0])
        outline = driver.execute_script(
            "const c = document.getElementById('view');"
            "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
            "let n = 0; for (let i = 0; i < d.length; i += 4)"
            "  if (d[i] === 255 && d[i + 1] === 196 && d[i + 2] === 0) n++;"
            "return n;"
        )
        assert low > 0 and outline > 0  # the overlay is drawn
        slider.send_keys(Keys.END)  # 0.95
        high = int(text("area").split(" px")[0])
        assert high < low
        slider.send_keys(Keys.HOME)

        driver.find_element(By.ID, "download-csv").click()
        target = downloads / "sonodistill-predictions.csv"
        wait.until(lambda d: target.is_file())
        rows = list(csv.DictReader(io.StringIO(target.read_text())))
        assert len(rows) == 30 and [r["frame"] for r in rows[:2]] == ["0", "1"]
        assert float(rows[3]["time_s"]) == pytest.approx(0.1, abs=1e-3)
        assert max(int(r["area_px"]) for r in rows) > 0 and rows[0]["area_mm2"] == ""
        assert b"SENTINEL" not in target.read_bytes()

        driver.find_element(By.ID, "close").click()
        wait.until(lambda d: text("status").startswith("Session closed"))
        assert app.state.sessions == {} and _files(app.work) == []
    finally:
        driver.quit()


def test_overlay_video_download_and_no_patient_identifiers(app, sentinel_cine):
    status, info = _post(app, sentinel_cine.read_bytes(), name="cine.dcm")
    assert status == 201 and info["kind"] == "dicom"
    done = _wait_done(app, info["id"])
    assert done["status"] == "done" and done["total"] == 30 and len(done["frames"]) == 30
    payloads = []
    for path in [
        "predictions.csv?threshold=0.1",
        "overlay.mp4?threshold=0.1&opacity=0.6",
        "frames/0.jpg",
        "probs/0.png",
    ]:
        with urllib.request.urlopen(f"{app.url}/api/sessions/{info['id']}/{path}") as response:
            payloads.append(response.read())
            assert response.headers["Cache-Control"] == "no-store"
    import av

    with av.open(io.BytesIO(payloads[1])) as video:
        assert sum(1 for _ in video.decode(video.streams.video[0])) == 30
    for data in [*payloads, json.dumps(done).encode()]:
        assert b"SENTINEL" not in data
    # Queries out of range: predict's --threshold and --opacity rules, an HTTP 400 saying so.
    for query, says in (
        ("predictions.csv?threshold=1", "threshold 1.0: must be > 0 and < 1"),
        ("overlay.mp4?threshold=0.5&opacity=1.5", "opacity 1.5: must be >= 0 and <= 1"),
    ):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{app.url}/api/sessions/{info['id']}/{query}")
        assert err.value.code == 400 and json.loads(err.value.read())["detail"] == says
    _close(app, info["id"])


def test_oversized_upload_is_refused_and_nothing_stays(app):
    big = b"\x89PNG\r\n\x1a\n" + bytes(1_200_000)
    # A declared Content-Length over the limit is refused before the body is read (only the
    # headers are sent: the server answers and closes while a client would still be sending).
    conn = http.client.HTTPConnection(app.url.removeprefix("http://"), timeout=10)
    conn.putrequest("POST", "/api/sessions?model=m0&name=big.png")
    conn.putheader("X-Sonodistill", "1")
    conn.putheader("Content-Length", str(len(big)))
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413 and "larger than 1 MB" in json.loads(response.read())["detail"]
    conn.close()
    # Without a Content-Length (chunked): refused while streaming, the partial file removed.
    conn = http.client.HTTPConnection(app.url.removeprefix("http://"))
    conn.request(
        "POST",
        "/api/sessions?model=m0&name=big.png",
        body=iter([big[:600_000]] * 3),
        headers={"X-Sonodistill": "1"},
        encode_chunked=True,
    )
    response = conn.getresponse()
    assert response.status == 413
    conn.close()
    assert _files(app.work) == [] and app.state.sessions == {}


def test_non_image_upload_is_refused(app, tmp_path):
    for body in [b"patient notes, not an image\n" * 20, b"%PDF-1.4\n" + bytes(500)]:
        status, answer = _post(app, body, name="scan.png")  # the name does not make it one
        assert status == 415 and "not an image" in answer["detail"]
    # A MetaImage header pointing at another file on the server is refused.
    header = b"ObjectType = Image\nNDims = 2\nDimSize = 4 4\nElementType = MET_UCHAR\n"
    status, answer = _post(app, header + b"ElementDataFile = /etc/hostname\n", name="x.mha")
    assert status == 415 and "another file" in answer["detail"]
    assert _files(app.work) == []


def test_client_file_names_never_become_paths(app, shared_data, tmp_path):
    image = (shared_data / BUSI / "benign" / "benign (3).png").read_bytes()
    marker = uuid.uuid4().hex
    for name in [f"../../../../tmp/{marker}.png", f"..\\..\\{marker}.png", f"/etc/{marker}.png"]:
        status, info = _post(app, image, name=name)
        assert status == 201 and info["name"] == f"{marker}.png"
        done = _wait_done(app, info["id"])
        assert done["status"] == "done" and done["total"] == 1
        _close(app, info["id"])
    for root in (Path("/tmp"), Path("/etc"), app.work, app.work.parent, Path.cwd()):
        assert not list(root.glob(f"**/*{marker}*" if root == app.work else f"*{marker}*"))
    assert _files(app.work) == []


def test_requests_from_other_sites_are_refused(app):
    image = b"\x89PNG\r\n\x1a\n" + bytes(100)
    request = urllib.request.Request(f"{app.url}/api/sessions?model=m0", data=image, method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:  # no X-Sonodistill header
        urllib.request.urlopen(request)
    assert err.value.code == 403
    request = urllib.request.Request(f"{app.url}/api/models", headers={"Host": "evil.example"})
    with pytest.raises(urllib.error.HTTPError) as err:  # DNS rebinding
        urllib.request.urlopen(request)
    assert err.value.code == 400
    status, answer = _post(app, image, query="model=m9")
    assert status == 400 and "unknown model" in answer["detail"]
    assert _files(app.work) == []


def test_page_and_scripts_are_served_from_the_package(app):
    with urllib.request.urlopen(app.url) as response:
        page = response.read().decode()
        assert "default-src 'self'" in response.headers["Content-Security-Policy"]
    assert "/static/app.js" in page and "http" not in page.replace("http-equiv", "")  # no CDN
    for asset in ("app.js", "app.css"):
        with urllib.request.urlopen(f"{app.url}/static/{asset}") as response:
            assert response.status == 200 and b"https://" not in response.read()


@pytest.mark.parametrize(
    "option, message",
    [
        ({"max_sessions": 0}, "--max_sessions 0: must be > 0"),
        ({"smoothing": 1.0}, "--smoothing 1.0: must be >= 0 and < 1"),
    ],
)
def test_bad_options_are_refused_before_binding(tmp_path, option, message):
    cfg = AppConfig(models=[str(tmp_path)], port=0, **option)
    with pytest.raises(UserError, match=message):
        serve(cfg)
