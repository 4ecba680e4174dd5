"""`sonodistill app`: a local web page to run one of your models on a file and watch it.

FastAPI + uvicorn serve a page (HTML/JS/CSS shipped inside the package: no CDN, works offline)
and a small JSON API. Pick a model (head checkpoints and export folders found under `--models`)
and a backend, drop an image, a cine loop, a DICOM or a 2D+t volume; the frames play with the
mask drawn in at the speed the pipeline was measured to run, with per-frame latency, threshold
and opacity controls, and downloads of the CSV and the overlay video at the chosen threshold.

Safety: the server binds 127.0.0.1 unless told otherwise and, whatever the address it binds,
answers only requests whose Host is this machine or a name given with `--allowed_hosts` (no
DNS rebinding) and that come from its own page (Origin); requests that change state must
carry the `X-Sonodistill` header, which a page from another site cannot send without a CORS
preflight (never granted). Uploads are limited in size, checked by their content (not their
name) and by their whole header (no reference to another file, a pixel budget) before a
pixel is decoded, and stored under names the server picks in a folder of its own (`workdir`);
see `sessions` for what is kept and for how long.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import re
import shutil
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.middleware.trustedhost import TrustedHostMiddleware

from sonodistill.config import check_fields
from sonodistill.deploy.app.sessions import (
    PixelBudget,
    Session,
    UploadRejected,
    accept_upload,
    display_name,
    keep_session,
    new_id,
    run_session,
    session_csv,
    session_video,
)
from sonodistill.deploy.app.workdir import clear_stale_workdirs, make_workdir
from sonodistill.deploy.config import OPACITY, AppConfig
from sonodistill.deploy.pipeline import FramePredictor, class_names, warm_up
from sonodistill.deploy.runtimes import BACKENDS, ModelFolder, open_model_folder, open_runner
from sonodistill.errors import INTERRUPTED, UserError, check
from sonodistill.io import atomic_path
from sonodistill.utils.fields import ClosedUnitInterval, OpenUnitInterval
from sonodistill.utils.fields import check as check_field

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
HEADER = "x-sonodistill"
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
ALWAYS_ALLOWED = ("localhost", "127.0.0.1", "[::1]")
"""Host names the app always answers to: this machine."""
_HOST_NAME = re.compile(r"(\*\.)?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*")


@dataclass
class ModelEntry:
    id: str
    label: str
    folder: ModelFolder

    def public(self) -> dict:
        spec = self.folder.spec
        return {
            "id": self.id,
            "label": self.label,
            "task_type": spec.task_type,
            "classes": list(spec.class_names),
            "image_size": self.folder.image_size,
            "backends": [{"id": b, "label": BACKENDS.get(b).label} for b in self.folder.backends],
        }


def discover_models(paths: list[str]) -> list[ModelEntry]:
    """Model folders among `paths` and their sub-folders (two levels), each once."""
    found: list[tuple[str, ModelFolder]] = []
    seen: set[Path] = set()
    for text in paths:
        root = Path(text)
        if not root.is_dir():
            raise FileNotFoundError(f"model folder {root} does not exist")
        candidates = [root, *sorted(p for p in root.glob("*") if p.is_dir())]
        candidates += sorted(p for p in root.glob("*/*") if p.is_dir())
        for path in candidates:
            if path.resolve() in seen or path.name == "head" and path.parent.resolve() in seen:
                continue
            try:
                folder = open_model_folder(path)
            except (FileNotFoundError, ValueError, TypeError):
                continue
            if not folder.image_size or not folder.backends:
                continue
            seen.add(path.resolve())
            label = root.name if path == root else f"{root.name}/{path.relative_to(root)}"
            found.append((label, folder))
    if not found:
        raise FileNotFoundError(
            f"no model under {', '.join(paths)}: give head checkpoints (evaluate "
            "--save_models true) or export folders (export --head)"
        )
    return [ModelEntry(f"m{i}", label, folder) for i, (label, folder) in enumerate(found)]


class AppState:
    """Models, sessions and the one worker thread that runs the models."""

    def __init__(self, cfg: AppConfig):
        self.cfg = cfg
        self.models = {m.id: m for m in discover_models(cfg.models)}
        self.sessions: dict[str, Session] = {}
        self.lock = threading.Lock()
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sonodistill-model")
        self.runners: dict[tuple[str, str], tuple] = {}
        for stale in clear_stale_workdirs(cfg.work_dir):
            log.info("removed %s, left by an app that is no longer running", stale)
        self.work = make_workdir(cfg.work_dir)
        self.limit = int(cfg.max_upload_mb * 2**20)
        self.budget = PixelBudget(cfg.max_frame_pixels, cfg.max_pixels, cfg.max_frames)
        self.uploads: set[anyio.CancelScope] = set()
        """Uploads being received, cancelled when the app stops (`stop_uploads`)."""
        self.stopping = False
        self.dropped = 0

    # --- models ---------------------------------------------------------------------------

    def runner(self, entry: ModelEntry, backend: str):
        """(runner, class names), opened and warmed up once per model and backend."""
        key = (entry.id, backend)
        if key not in self.runners:
            folder = entry.folder
            runner = open_runner(folder, backend, self.cfg.threads)
            outputs = warm_up(runner, folder.image_size)
            self.runners[key] = (runner, class_names(folder.spec, outputs.shape[1]))
        return self.runners[key]

    # --- sessions -------------------------------------------------------------------------

    def get(self, sid: str) -> Session | None:
        with self.lock:
            session = self.sessions.get(sid)
        if session is not None:
            session.seen = time.time()
        return session

    def add(self, session: Session) -> None:
        self.sweep()
        with self.lock:
            self.sessions[session.id] = session
            extra = len(self.sessions) - self.cfg.max_sessions
            oldest = sorted(self.sessions.values(), key=lambda s: s.seen)[: max(0, extra)]
        for old in oldest:
            self.close(old.id)

    def sweep(self) -> None:
        now = time.time()
        with self.lock:
            stale = [s.id for s in self.sessions.values() if now - s.seen > self.cfg.session_ttl_s]
        for sid in stale:
            self.close(sid)

    def close(self, sid: str) -> bool:
        with self.lock:
            session = self.sessions.pop(sid, None)
        if session is None:
            return False
        session.closed = True  # a running job stops at its next frame
        session.jpegs.clear(), session.probs.clear(), session.labels.clear()
        if session.status not in ("queued", "running"):  # else the job removes its folder
            shutil.rmtree(session.folder, ignore_errors=True)
        return True

    def start(
        self, session: Session, entry: ModelEntry, upload: Path, smoothing: float, limit: int
    ):
        def job() -> None:
            status = "failed"
            try:
                if session.closed:
                    return
                runner, names = self.runner(entry, session.backend)
                session.classes = names
                size = entry.folder.image_size
                predictor = FramePredictor(runner, entry.folder.spec, size, smoothing)
                status = run_session(session, upload, predictor, entry.folder.spec, limit)
                if self.cfg.keep and status == "done" and not session.closed:
                    keep_session(session, upload, Path(self.cfg.keep))
            except Exception as exc:
                session.error = str(exc)[:300] or type(exc).__name__
                log.exception("session %s failed", session.id)
            finally:
                shutil.rmtree(session.folder, ignore_errors=True)  # the upload: gone now
                session.status = status  # published after the upload is gone

        session.status = "queued"
        self.worker.submit(job)

    def stop_uploads(self) -> None:
        """The app is stopping: uploads still arriving end now (each removes its partial
        file and answers 503) instead of holding the stop until their client finishes."""
        self.stopping = True
        self.dropped += len(self.uploads)
        for scope in list(self.uploads):
            scope.cancel()

    def shutdown(self) -> None:
        with self.lock:
            ids = list(self.sessions)
        for sid in ids:
            self.close(sid)
        self.worker.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self.work, ignore_errors=True)


def create_app(cfg: AppConfig):
    """The FastAPI application (its `state.sonodistill` is the AppState)."""
    state = AppState(cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        state.shutdown()

    app = FastAPI(title="sonodistill", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.sonodistill = state

    @app.middleware("http")
    async def guard(request: Request, call_next):
        origin = request.headers.get("origin")
        host = request.headers["host"].lower()  # present and allowed: TrustedHostMiddleware
        if origin is not None and urlsplit(origin).netloc.lower() != host:
            return JSONResponse({"detail": f"request from {origin} refused"}, status_code=403)
        if request.method not in ("GET", "HEAD") and request.headers.get(HEADER) != "1":
            return JSONResponse({"detail": f"missing {HEADER} header"}, status_code=403)
        response = await call_next(request)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:; "
            "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
        )
        if request.url.path.startswith("/api/"):
            response.headers["Cache-Control"] = "no-store"
        return response

    # Added last, so it runs first: the Host check applies to every request.
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts(cfg))

    def session_or_404(sid: str) -> Session:
        session = state.get(sid)
        if session is None:
            raise HTTPException(404, "no such session (closed or expired)")
        return session

    @app.get("/")
    def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/models")
    def models():
        return {
            "models": [m.public() for m in state.models.values()],
            "max_upload_mb": cfg.max_upload_mb,
            "max_frames": cfg.max_frames,
            "smoothing": cfg.smoothing,
        }

    @app.post("/api/sessions", status_code=201)
    async def upload(
        request: Request, model: str, backend: str = "", name: str = "", smooth: bool = False
    ):
        if state.stopping:
            raise HTTPException(503, "the app is stopping")
        state.sweep()
        entry = state.models.get(model)
        if entry is None:
            raise HTTPException(400, f"unknown model {model!r}")
        backend = backend or entry.folder.backends[0]
        if backend not in entry.folder.backends:
            raise HTTPException(400, f"model {entry.label} has no backend {backend!r}")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > state.limit:
            raise HTTPException(413, f"file larger than {cfg.max_upload_mb:g} MB")
        sid = new_id()
        folder = state.work / f"s-{sid}"
        folder.mkdir(mode=0o700)
        stop = anyio.CancelScope()
        state.uploads.add(stop)
        try:
            with stop:
                try:
                    upload = await _receive(request, folder / "upload", state.limit)
                finally:
                    state.uploads.discard(stop)
            if stop.cancelled_caught:
                raise UploadRejected("the app is stopping: upload again once it is back", 503)
            kind, upload, size = await asyncio.to_thread(accept_upload, upload, state.budget)
        except UploadRejected as exc:
            shutil.rmtree(folder, ignore_errors=True)
            raise HTTPException(exc.status, str(exc)) from None
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        session = Session(
            sid,
            model,
            backend,
            display_name(name),
            folder,
            kind=kind,
            task_type=entry.folder.spec.task_type,
        )
        state.add(session)
        smoothing = cfg.smoothing if smooth else 0.0
        state.start(session, entry, upload, smoothing, state.budget.frames(size))
        return session.info()

    @app.get("/api/sessions/{sid}")
    def status(sid: str, since: int = 0):
        return session_or_404(sid).info(max(0, since))

    def frame_bytes(sid: str, i: int, attr: str, media: str):
        data = getattr(session_or_404(sid), attr)
        if not 0 <= i < len(data):
            raise HTTPException(404, f"frame {i} is not ready")
        return Response(data[i], media_type=media)

    @app.get("/api/sessions/{sid}/frames/{i}.jpg")
    def frame(sid: str, i: int):
        return frame_bytes(sid, i, "jpegs", "image/jpeg")

    @app.get("/api/sessions/{sid}/probs/{i}.png")
    def probs(sid: str, i: int):
        return frame_bytes(sid, i, "probs", "image/png")

    @app.get("/api/sessions/{sid}/labels/{i}.png")
    def labels(sid: str, i: int):
        return frame_bytes(sid, i, "labels", "image/png")

    def finished(sid: str) -> Session:
        session = session_or_404(sid)
        if session.status != "done":
            raise HTTPException(409, f"session is {session.status}, not done")
        return session

    def _check(threshold: float, opacity: float = OPACITY) -> None:
        """The queries by the rules of predict's --threshold and --opacity (HTTP 400)."""
        try:
            check_field(OpenUnitInterval, threshold, "threshold")
            check_field(ClosedUnitInterval, opacity, "opacity")
        except UserError as err:
            raise HTTPException(400, str(err)) from None

    @app.get("/api/sessions/{sid}/predictions.csv")
    def csv(sid: str, threshold: float = 0.5):
        _check(threshold)
        text = session_csv(finished(sid), threshold)
        disposition = 'attachment; filename="sonodistill-predictions.csv"'
        return Response(text, media_type="text/csv", headers={"Content-Disposition": disposition})

    @app.get("/api/sessions/{sid}/overlay.mp4")
    async def video(sid: str, threshold: float = 0.5, opacity: float = OPACITY):
        _check(threshold, opacity)
        data = await asyncio.to_thread(session_video, finished(sid), threshold, opacity)
        disposition = 'attachment; filename="sonodistill-overlay.mp4"'
        return Response(data, media_type="video/mp4", headers={"Content-Disposition": disposition})

    @app.delete("/api/sessions/{sid}")
    def close(sid: str):
        if not state.close(sid):
            raise HTTPException(404, "no such session")
        return {"closed": sid}

    return app


async def _receive(request, path: Path, limit: int) -> Path:
    """Stream the request body to `path` (atomically: a temporary file renamed when complete;
    no fsync, it is deleted once decoded), refusing more than `limit` bytes (413)."""
    size = 0
    with atomic_path(path, durable=False) as tmp, open(tmp, "wb") as fh:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise UploadRejected(f"file larger than {limit / 2**20:g} MB", 413)
            fh.write(chunk)
    if size == 0:
        raise UploadRejected("empty upload", 400)
    return path


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free port); OSError says why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError:
        sock.close()
        raise
    sock.listen(64)
    return sock


def allowed_hosts(cfg: AppConfig) -> list[str]:
    """Host names the app answers to: this machine, the address it binds (not a wildcard
    such as 0.0.0.0: nobody browses to it) and `--allowed_hosts`; IPv6 in brackets."""
    names = [*ALWAYS_ALLOWED, cfg.host, *cfg.allowed_hosts]
    names = [n.strip("[]").lower() for n in names if n.strip("[]") not in ("0.0.0.0", "::", "")]
    return list(dict.fromkeys(f"[{n}]" if ":" in n else n for n in names))


def check_options(cfg: AppConfig) -> None:
    """Every option valid, before anything is bound or written (UserError otherwise)."""
    if not cfg.models:
        raise UserError("give --models+ FOLDER (head checkpoints or export folders)")
    check_fields(cfg)  # the ranges of the fields' types
    check(math.isfinite(cfg.max_upload_mb), "--max_upload_mb", cfg.max_upload_mb, "must be finite")
    for name in cfg.allowed_hosts:
        check(
            _valid_host(name),
            "--allowed_hosts",
            name,
            "must be a host name, an address or *.domain, without scheme or port",
        )


def _valid_host(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
        return True
    except ValueError:
        return _HOST_NAME.fullmatch(name.lower()) is not None


class _Server(uvicorn.Server):
    """uvicorn's server, which stops the uploads in flight as it begins to stop: it would
    wait for them (a stalled client never ends), then cancel them with a traceback."""

    async def shutdown(self, sockets=None) -> None:
        self.config.app.state.sonodistill.stop_uploads()
        await super().shutdown(sockets=sockets)


def server(cfg: AppConfig) -> _Server:
    """A uvicorn Server for the app (run it with `.run(sockets=[bind(...)])`)."""
    app = create_app(cfg)
    return _Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))


def serve(cfg: AppConfig) -> int:
    """Check the options, bind, say where, serve until SIGINT (Ctrl-C) or SIGTERM; on the
    way out every session is dropped, uploads in flight included, and one line says so.
    Returns the exit code: 130 after Ctrl-C (as every command), 0 after SIGTERM (the stop a
    service manager asks for)."""
    check_options(cfg)
    try:
        sock = bind(cfg.host, cfg.port)
    except OSError as exc:
        raise UserError(
            f"--host {cfg.host} --port {cfg.port}: cannot listen ({exc.strerror})"
        ) from None
    instance = server(cfg)
    state = instance.config.app.state.sonodistill
    if cfg.host not in LOOPBACK:
        log.warning(
            "binding %s: the page is reachable from the network, under the names %s",
            cfg.host,
            ", ".join(allowed_hosts(cfg)),
        )
    port = sock.getsockname()[1]
    print(f"sonodistill app: {len(state.models)} models; open http://{_url_host(cfg.host)}:{port}/")
    with _signals_received() as received:
        instance.run(sockets=[sock])
    why = f" ({', '.join(signal.Signals(s).name for s in received)})" if received else ""
    dropped = f"; {state.dropped} upload(s) in progress dropped" if state.dropped else ""
    print(f"sonodistill app: stopped{why}{dropped}; sessions closed, uploads deleted")
    return INTERRUPTED if signal.SIGINT in received else 0


@contextlib.contextmanager
def _signals_received():
    """Signals uvicorn passes on once it has stopped: it re-raises the one that stopped it,
    which would end in a KeyboardInterrupt (SIGINT) or kill the process (SIGTERM) after
    the clean stop; here they are only noted."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    sigs = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda sig, _frame: received.append(sig)) for s in sigs}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _url_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::") else host
