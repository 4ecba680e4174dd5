"""The faults and attacks of issue 22, one table per part of it, each row asserting the
outcome (status or exit code, the message, and that nothing was served or left behind)."""

from __future__ import annotations

import contextlib
import functools
import http.client
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import BUSI, VIDEOS

# --- the app opens only what was uploaded (issue 22.3)

PLUS = "corpus/plus/TestImages"


@dataclass
class AppRow:
    id: str
    do: str
    """upload FILE | get HOST | post ORIGIN | cli ARGS | budget W H FRAMES | start | stop SIG"""
    expect: int
    """HTTP status, or exit code (cli, stop), or 0 for a budget or a start that went right."""
    says: str = ""
    """Text the answer (its detail, the error line, the stop line) must hold."""
    options: dict = field(default_factory=dict)
    """AppConfig fields of the app under test."""


APP_ROWS = [
    # -- references outside the upload, found by parsing the whole header
    AppRow(
        "NRRD header over 4 KB ending with data file: /etc/passwd",
        "upload nrrd_data_file",
        415,
        "refers to data outside the upload (data file: /etc/passwd)",
    ),
    AppRow("NRRD data file LIST", "upload nrrd_list", 415, "(data file: LIST)"),
    AppRow(
        "NRRD printf-style data file",
        "upload nrrd_pattern",
        415,
        "(data file: /etc/slice%03d.raw 1 4 1)",
    ),
    AppRow(
        "MetaImage header over 4 KB ending with ElementDataFile = /etc/passwd",
        "upload mha_data_file",
        415,
        "refers to data outside the upload (ElementDataFile = /etc/passwd)",
    ),
    AppRow("MetaImage ElementDataFile = LIST", "upload mha_list", 415, "(ElementDataFile = LIST)"),
    AppRow("NIfTI pair header (ni1)", "upload nifti_pair", 415, "(NIfTI pair: voxels in"),
    AppRow(
        "DICOM naming another file (ReferencedFileID)",
        "upload dicom_referenced_file",
        415,
        "(ReferencedFileID = ",
    ),
    AppRow(
        "a real PLUS sequence with a 15 KB header is accepted",
        "upload plus_sequence",
        201,
        "itk",
    ),
    AppRow("a NRRD with its data attached is accepted", "upload nrrd_attached", 201, "itk"),
    # -- the pixel budget, from the header, before decoding
    AppRow(
        "JPEG DICOM with one 16384 x 16384 frame (3 MB)",
        "upload dicom_16384",
        413,
        "16384 x 16384 = 268,435,456 pixels per frame, more than --max_frame_pixels 16,777,216",
    ),
    AppRow(
        "DICOM declaring 64 x 64 over a 16384 x 16384 JPEG",
        "upload dicom_16384_as_64",
        415,
        "frame 0's codestream is 16384 x 16384, not the 64 x 64",
    ),
    AppRow(
        "PNG over --max_frame_pixels",
        "upload busi_png",
        413,
        "558 x 471 = 262,818 pixels per frame, more than --max_frame_pixels 100,000",
        {"max_frame_pixels": 100_000},
    ),
    AppRow(
        "mp4 over --max_pixels",
        "upload lung_mp4",
        413,
        "350 x 350 x 100 frames = 12,250,000 pixels, more than --max_pixels 10,000,000",
        {"max_pixels": 10_000_000},
    ),
    AppRow(
        "MetaImage sequence over --max_pixels",
        "upload plus_sequence",
        413,
        "820 x 616 x 21 frames",
        {"max_pixels": 10_000_000},
    ),
    AppRow("a 1024 x 1024 cine of 1000 frames is within the defaults", "budget 1024 1024 1000", 0),
    AppRow(
        "a 16384 x 16384 frame is not",
        "budget 16384 16384 1",
        413,
        "more than --max_frame_pixels",
    ),
    # -- DNS rebinding and other sites' pages
    AppRow(
        "Host evil.example under --host 0.0.0.0",
        "get evil.example",
        400,
        "Invalid host header",
        {"host": "0.0.0.0"},
    ),
    AppRow(
        "Host evil.example under --host 127.0.0.2",
        "get evil.example",
        400,
        "Invalid host header",
        {"host": "127.0.0.2"},
    ),
    AppRow("the bind address is a host", "get 127.0.0.2", 200, '"models"', {"host": "127.0.0.2"}),
    AppRow(
        "--allowed_hosts admits a name",
        "get scanner.ward.example",
        200,
        '"models"',
        {"host": "0.0.0.0", "allowed_hosts": ["scanner.ward.example"]},
    ),
    AppRow(
        "--allowed_hosts admits that name only",
        "get evil.example",
        400,
        "Invalid host header",
        {"host": "0.0.0.0", "allowed_hosts": ["scanner.ward.example"]},
    ),
    AppRow(
        "a page of another site posts with our header",
        "post http://evil.example",
        403,
        "request from http://evil.example refused",
    ),
    # -- options checked before binding, stale folders, a clean stop
    AppRow(
        "--port 99999",
        "cli --port 99999",
        2,
        "sonodistill app: error: --port 99999: must be in 1..65535 (0: any free port)",
    ),
    AppRow(
        "--allowed_hosts '*' would turn the check off",
        "cli --allowed_hosts+ *",
        2,
        "--allowed_hosts *: must be a host name, an address or *.domain",
    ),
    AppRow(
        "--max_pixels 0",
        "cli --max_pixels 0",
        2,
        "--max_pixels 0: must be > 0",
    ),
    AppRow(
        "temp folder of a killed app cleared at start, a live app's kept",
        "start",
        0,
        "stale: removed; live: kept",
    ),
    pytest.param(
        AppRow(
            "SIGTERM with an upload in flight",
            "stop SIGTERM",
            0,
            "sonodistill app: stopped (SIGTERM); 1 upload(s) in progress dropped",
        ),
        marks=pytest.mark.slow,
    ),
    pytest.param(
        AppRow(
            "SIGINT with an upload in flight",
            "stop SIGINT",
            0,
            "sonodistill app: stopped (SIGINT); 1 upload(s) in progress dropped",
        ),
        marks=pytest.mark.slow,
    ),
]


@pytest.fixture(scope="module")
def head_models(tmp_path_factory) -> Path:
    """A folder holding one untrained ResNet-18 U-Net head (no row looks at its masks)."""
    import torch

    from sonodistill.evaluate.head_checkpoint import HeadSpec, build_head_model, save_head

    spec = HeadSpec(
        task_type="seg",
        encoder="random:resnet18",
        num_classes=2,
        class_names=["background", "lesion"],
        image_size=64,
    )
    torch.manual_seed(0)
    models = tmp_path_factory.mktemp("fault_models")
    save_head(build_head_model(spec).eval(), spec, models / "r18" / "head")
    return models


@functools.cache
def _jpeg_dicom(size: int, rows: int) -> bytes:
    """A JPEG baseline DICOM whose frame is size x size, mostly black (3 MB at 16384), and
    whose header declares rows x rows."""
    from PIL import Image, ImageDraw
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit, SecondaryCaptureImageStorage, generate_uid

    image = Image.new("L", (size, size))
    ImageDraw.Draw(image).rectangle((100, 100, 300, 300), fill=200)
    jpeg = io.BytesIO()
    image.save(jpeg, "JPEG", quality=50)
    del image
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    ds.Modality, ds.Rows, ds.Columns, ds.SamplesPerPixel = "US", rows, rows, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate([jpeg.getvalue()])
    ds["PixelData"].VR = "OB"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _dicom_referencing(data: Path) -> bytes:
    """The real RGB DICOM with a ReferencedFileID nested in a sequence item."""
    import pydicom
    from pydicom.dataset import Dataset

    ds = pydicom.dcmread(data / "corpus/dicom/examples_rgb_color.dcm")
    item = Dataset()
    item.ReferencedFileID = ["ETC", "PASSWD"]
    ds.ReferencedImageSequence = [item]
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


def _nrrd_attached(data: Path, tmp: Path) -> bytes:
    import SimpleITK as sitk

    image = sitk.ReadImage(str(data / PLUS / "SpinePhantomFreehandReconstructed.mha"))
    sitk.WriteImage(image, str(tmp / "volume.nrrd"), useCompression=True)
    return (tmp / "volume.nrrd").read_bytes()


def _nifti_pair() -> bytes:
    import nibabel as nib
    import numpy as np

    return nib.Nifti1Pair(np.zeros((4, 4, 2), np.uint8), np.eye(4)).header.binaryblock


NRRD = b"NRRD0004\ntype: uint8\ndimension: 2\nsizes: 8 4\nencoding: raw\n"
MHA = b"ObjectType = Image\nNDims = 2\nDimSize = 8 4\nElementType = MET_UCHAR\n"
PADDING = b"".join(
    b"# a comment line to push the field past 4096 bytes %03d\n" % i for i in range(90)
)
MHA_PADDING = PADDING.replace(b"# a comment", b"Comment = a")
UPLOADS = {
    "nrrd_data_file": lambda data, tmp: NRRD + PADDING + b"data file: /etc/passwd\n",
    "nrrd_list": lambda data, tmp: NRRD + b"data file: LIST\n/etc/passwd\n/etc/hostname\n",
    "nrrd_pattern": lambda data, tmp: NRRD + b"data file: /etc/slice%03d.raw 1 4 1\n",
    "mha_data_file": lambda data, tmp: MHA + MHA_PADDING + b"ElementDataFile = /etc/passwd\n",
    "mha_list": lambda data, tmp: MHA + b"ElementDataFile = LIST\n/etc/passwd\n",
    "nifti_pair": lambda data, tmp: _nifti_pair(),
    "dicom_referenced_file": lambda data, tmp: _dicom_referencing(data),
    "plus_sequence": lambda data, tmp: (data / PLUS / "BoneUltrasound_L14.igs.mha").read_bytes(),
    "nrrd_attached": _nrrd_attached,
    "dicom_16384": lambda data, tmp: _jpeg_dicom(16384, 16384),
    "dicom_16384_as_64": lambda data, tmp: _jpeg_dicom(16384, 64),
    "busi_png": lambda data, tmp: (data / BUSI / "benign" / "benign (3).png").read_bytes(),
    "lung_mp4": lambda data, tmp: (data / VIDEOS / "patient_10_L1.mp4").read_bytes(),
}


@contextlib.contextmanager
def _running_app(models: Path, work: Path, **options):
    """The app in a thread. It binds --host when that is this machine (127.0.0.2), else
    127.0.0.1: under 0.0.0.0 only the Host rule matters, not who can reach the socket."""
    from sonodistill.deploy.app.server import AppConfig, bind, check_options, server

    cfg = AppConfig(models=[str(models)], work_dir=str(work), threads=1, **options)
    check_options(cfg)
    address = cfg.host if cfg.host.startswith("127.") else "127.0.0.1"
    sock = bind(address, 0)
    instance = server(cfg)
    thread = threading.Thread(target=instance.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):
        if instance.started:
            break
        time.sleep(0.05)
    try:
        yield SimpleNamespace(
            address=address, port=sock.getsockname()[1], state=instance.config.app.state
        )
    finally:
        instance.should_exit = True
        thread.join(10)


def _request(app, method: str, path: str, body: bytes = b"", headers=None) -> tuple[int, str]:
    conn = http.client.HTTPConnection(app.address, app.port, timeout=60)
    try:
        conn.request(method, path, body=body or None, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        conn.close()


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def _app_answer(row: AppRow, models: Path, tmp: Path, data: Path, monkeypatch) -> tuple[int, str]:
    action, _, arg = row.do.partition(" ")
    work = tmp / "work"
    if action == "upload":
        body = UPLOADS[arg](data, tmp)
        decoded = []
        if row.expect != 201:  # any decoding is a failure: the header alone must refuse it
            import pydicom.pixels

            from sonodistill.deploy.app import sessions

            fail = lambda *a, **k: decoded.append(a) or iter(())  # noqa: E731
            monkeypatch.setattr(sessions, "read_frames", fail)
            monkeypatch.setattr(pydicom.pixels, "iter_pixels", fail)
        with _running_app(models, work, **row.options) as app:
            headers = {"X-Sonodistill": "1"}
            status, text = _request(app, "POST", "/api/sessions?model=m0&name=f", body, headers)
            state = app.state.sonodistill
            if status == 201:
                info = json.loads(text)
                _request(app, "DELETE", f"/api/sessions/{info['id']}", headers=headers)
                return status, info["kind"]
            assert state.sessions == {} and decoded == []  # nothing decoded, nothing to serve
            assert _files(work) == []  # the refused upload is gone
        return status, json.loads(text)["detail"]
    if action in ("get", "post"):
        with _running_app(models, work, **row.options) as app:
            if action == "get":
                return _request(app, "GET", "/api/models", headers={"Host": arg})
            headers = {"X-Sonodistill": "1", "Origin": arg}
            png = (data / BUSI / "benign" / "benign (3).png").read_bytes()
            status, text = _request(app, "POST", "/api/sessions?model=m0", png, headers)
            assert app.state.sonodistill.sessions == {}
            return status, text
    if action == "cli":
        from sonodistill.deploy.app import server

        # A check that lets the option through must fail the row, not serve forever.
        monkeypatch.setattr(server._Server, "run", lambda self, sockets=None: None)
        argv = ["app", "--models+", str(models), "--work_dir", str(work), "--port", "0"]
        return _cli([*argv, *arg.split()])
    if action == "budget":
        from sonodistill.data.headers import Declared, TooLarge, check_pixel_budget
        from sonodistill.deploy.app.server import AppConfig

        cfg = AppConfig()
        w, h, frames = map(int, arg.split())
        try:
            check_pixel_budget(
                Declared(w, h, frames), cfg.max_frame_pixels, cfg.max_pixels, cfg.max_frames
            )
        except TooLarge as exc:
            return 413, str(exc)
        return 0, ""
    if action == "start":
        return _start(models, work)
    if action == "stop":
        return _stop(models, work, getattr(signal, arg))
    raise ValueError(row.do)


def _cli(argv: list[str]) -> tuple[int, str]:
    """`sonodistill ARGV` in-process: (exit code, stderr), which must be one line."""
    from contextlib import redirect_stderr

    from sonodistill.cli import main

    err = io.StringIO()
    with redirect_stderr(err):
        code = main(argv)
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err.getvalue(), err.getvalue()
    return code, lines[0]


def _start(models: Path, work: Path) -> tuple[int, str]:
    """A killed app's folder (its process is gone) and a live one's, then an app starts."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = work / f"sonodistill-app-{gone.pid}-k9k9k9k9" / "s-1234"
    live = work / f"sonodistill-app-{os.getpid()}-a1a1a1a1" / "s-5678"
    for folder in (stale, live):
        folder.mkdir(parents=True)
        (folder / ".upload.partial.tmp").write_bytes(b"\x89PNG half an upload")
    with _running_app(models, work):
        pass
    answer = (
        f"stale: {'kept' if stale.parent.exists() else 'removed'}; "
        f"live: {'kept' if live.parent.exists() else 'removed'}"
    )
    return 0, answer


def _stop(models: Path, work: Path, sig: signal.Signals) -> tuple[int, str]:
    """A real `sonodistill app` process stopped by `sig` while an upload is arriving: a quiet
    stop (no traceback, exit 0), the partial upload gone, the client told (503)."""
    cmd = [sys.executable, "-m", "sonodistill.cli", "app", "--models+", str(models)]
    cmd += ["--port", "0", "--work_dir", str(work)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        first = process.stdout.readline()
        port = int(re.search(r":(\d+)/$", first.strip())[1])
        client = socket.create_connection(("127.0.0.1", port), timeout=30)
        client.sendall(
            b"POST /api/sessions?model=m0 HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Sonodistill: 1\r\n"
            b"Content-Length: 1000000\r\n\r\n\x89PNG" + bytes(5000)
        )
        for _ in range(300):  # until the partial upload is on disk
            if _files(work):
                break
            time.sleep(0.05)
        assert _files(work), "the upload never started"
        process.send_signal(sig)
        out, err = process.communicate(timeout=60)
        reply = client.recv(4096).decode("latin-1")
        client.close()
    finally:
        if process.poll() is None:
            process.kill()
    assert "Traceback" not in err and "ERROR" not in err, err
    assert reply.startswith("HTTP/1.1 503") and "the app is stopping" in reply
    assert list(work.iterdir()) == []  # the partial upload and the app's folder are gone
    return process.returncode, out.strip().splitlines()[-1]


@pytest.mark.parametrize("row", APP_ROWS, ids=lambda r: r.id)
def test_the_app_opens_only_what_was_uploaded(row, head_models, shared_data, tmp_path, monkeypatch):
    code, text = _app_answer(row, head_models, tmp_path, shared_data, monkeypatch)
    assert code == row.expect, text
    assert row.says in text
