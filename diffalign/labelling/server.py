"""The labelling page and its JSON API (Flask), served on 127.0.0.1 by werkzeug's threaded server.

Routes (every error is JSON ``{"error": "..."}``, never an HTML page):

- ``GET /``: the page (``diffalign/resources/labelling``: one HTML file, one script, one style sheet);
- ``GET /api/items?annotator=NAME``: the mode, images per prompt, progress and the prompts still to label;
- ``GET /images/<path>``: a regular file inside the served folder (nothing outside it, symlinks included);
- ``POST /api/labels``: one label line ``{"prompt_id", "annotator", "scores", "mode"?}`` → the stored line;
- ``DELETE /api/labels/last?annotator=NAME``: undo that annotator's last label → the removed line.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Iterable
from importlib import resources
from pathlib import Path, PurePosixPath
from urllib.parse import quote, urlsplit

import flask
from werkzeug.exceptions import HTTPException
from werkzeug.serving import BaseWSGIServer, make_server

from ..data.errors import DataError
from .items import LabelFolder, read_items
from .store import LabelError, LabelStore, check_annotator

MODES = ("rank", "best-worst", "thumbs", "pair")
MAX_BODY = 64 * 1024  # a label is ~100 bytes; anything near this is not one
ASSETS = {"label.js": "text/javascript", "label.css": "text/css"}
STORE = "diffalign_label_store"  # the app's LabelStore, in app.extensions
# The page loads only its own files; no inline script runs, so an injected string could not execute either.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class ApiError(Exception):
    """An API answer other than 200: the status and the one-line message of its JSON body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def check_mode(mode: str, folder: LabelFolder) -> str:
    """``mode`` when the folder can be labelled that way, else a one-line :class:`DataError`."""
    if mode not in MODES:
        raise DataError(f"--mode {mode!r}: choose one of {', '.join(MODES)}")
    k = folder.per_prompt
    if mode == "pair" and k != 2:
        raise DataError(f"--mode pair needs exactly 2 images per prompt; {folder.folder} has {k}: use --mode "
                        "rank, best-worst or thumbs")
    if mode in ("rank", "best-worst") and k < 2:
        raise DataError(f"--mode {mode} needs at least 2 images per prompt; {folder.folder} has {k}: use --mode thumbs")
    return mode


def create_app(folder: str | Path, labels: str | Path | None = None, mode: str = "rank",
               max_body: int = MAX_BODY, hosts: Iterable[str] = ()) -> flask.Flask:
    """The labelling app over ``folder`` (a ``diffalign sample`` or ``make-pairs`` output), storing labels in
    ``labels`` (default ``<folder>/labels.jsonl``). Requests must name the server by an IP address,
    ``localhost`` or one of ``hosts`` (``"*"``: any name). Holds the label file's lock until :func:`close_app`."""
    items = read_items(folder)
    check_mode(mode, items)
    root = items.folder.resolve()
    store = LabelStore(Path(labels) if labels else items.folder / "labels.jsonl", items.per_prompt, items.prompt_ids)

    app = flask.Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = max_body
    app.url_map.merge_slashes = False  # /images//etc/x is refused as an absolute path, not redirected
    app.json.sort_keys = False  # keep the label's own key order (prompt_id, annotator, scores, mode)
    app.extensions[STORE] = store
    names = {"localhost", *(h.lower() for h in hosts)}
    page = resources.files("diffalign.resources") / "labelling"

    def annotator_arg() -> str:
        try:
            return check_annotator(flask.request.args.get("annotator"))
        except LabelError as e:
            raise ApiError(400, str(e)) from None

    @app.get("/")
    def index() -> flask.Response:
        return flask.Response(page.joinpath("index.html").read_bytes(), mimetype="text/html")

    @app.get("/favicon.ico")
    def favicon() -> flask.Response:
        return flask.Response(status=204)  # none: the browser would otherwise log a 404 on every load

    @app.get("/assets/<name>")
    def asset(name: str) -> flask.Response:
        if name not in ASSETS:
            raise ApiError(404, f"no asset {name!r}")
        return flask.Response(page.joinpath(name).read_bytes(), mimetype=ASSETS[name])

    @app.get("/api/items")
    def list_items() -> flask.Response:
        annotator = annotator_arg()
        done = store.done(annotator)
        todo = [{"prompt_id": item.prompt_id, "prompt": item.prompt,
                 "images": ["/images/" + quote(image) for image in item.images]}
                for item in items.items if item.prompt_id not in done]
        return flask.jsonify({"mode": mode, "per_prompt": items.per_prompt, "total": len(items.items),
                              "done": len(items.items) - len(todo), "items": todo})

    @app.get("/images/<path:name>")
    def image(name: str) -> flask.Response:
        rel = PurePosixPath(name)
        if rel.is_absolute() or ".." in rel.parts or "\\" in name or "\0" in name:
            raise ApiError(404, f"no image {name!r} in the served folder")
        path = (root / rel).resolve()  # follows symlinks: the target itself must lie inside the folder
        if not path.is_relative_to(root) or not path.is_file():
            raise ApiError(404, f"no image {name!r} in the served folder")
        return flask.send_file(path, max_age=0)

    @app.post("/api/labels")
    def add_label() -> flask.Response:
        check_origin()
        line = json_body()
        try:
            return flask.jsonify(store.add(line))
        except LabelError as e:
            raise ApiError(e.status, str(e)) from None

    @app.delete("/api/labels/last")
    def undo_label() -> flask.Response:
        check_origin()
        annotator = annotator_arg()
        removed = store.undo(annotator)
        if removed is None:
            raise ApiError(404, f"annotator {annotator!r} has no label to undo")
        return flask.jsonify(removed)

    @app.before_request
    def check_host() -> None:
        # DNS rebinding: a web page whose own name resolves to 127.0.0.1 would otherwise reach this API
        try:
            name = urlsplit(f"//{flask.request.host}").hostname or ""
        except ValueError:  # not a host at all ("[oops")
            name = ""
        if "*" not in names and name not in names and not _is_ip(name):
            raise ApiError(403, f"Host {flask.request.host!r}: open the page by 127.0.0.1 or localhost")

    @app.after_request
    def headers(response: flask.Response) -> flask.Response:
        response.headers.update(SECURITY_HEADERS)
        if flask.request.path.startswith("/api/"):
            response.headers["Cache-Control"] = "no-store"
        return response

    @app.errorhandler(ApiError)
    def api_error(e: ApiError) -> tuple[flask.Response, int]:
        return flask.jsonify({"error": e.message}), e.status

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException) -> tuple[flask.Response, int]:
        status = e.code or 500
        message = (f"request body over {max_body} bytes; a label is one small JSON object" if status == 413
                   else f"{e.name}: {flask.request.method} {flask.request.path}")
        return flask.jsonify({"error": message}), status

    @app.errorhandler(Exception)
    def unexpected(e: Exception) -> tuple[flask.Response, int]:
        # a bug or a failing disk (the label file cannot be written): the page shows this line, the log the trace
        app.logger.exception("%s %s failed", flask.request.method, flask.request.path)
        return flask.jsonify({"error": f"server error: {type(e).__name__}: {e}"}), 500

    return app


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def json_body() -> object:
    """The request's JSON body (any JSON value; the store checks the shape). NaN and Infinity parse, as Python's
    json reads them, so the store can refuse them naming the field."""
    data = flask.request.get_data(cache=False)  # over MAX_CONTENT_LENGTH: 413 raised here
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ApiError(400, "body: not UTF-8; send one JSON object") from None
    except json.JSONDecodeError as e:
        raise ApiError(400, f"body: malformed JSON ({e.msg} at character {e.pos}); send one JSON object") from None


def check_origin() -> None:
    """Refuse a write sent by a page of another site (a browser names it in ``Origin``); scripts send none."""
    origin = flask.request.headers.get("Origin")
    if origin and urlsplit(origin).netloc != flask.request.host:
        raise ApiError(403, f"Origin {origin!r}: labels are accepted only from the labelling page itself")


def label_store(app: flask.Flask) -> LabelStore:
    """The :class:`LabelStore` an app made by :func:`create_app` writes to."""
    return app.extensions[STORE]


def close_app(app: flask.Flask) -> None:
    """Release the label file (its lock), so another app or server may open it."""
    label_store(app).close()


def make_label_server(folder: str | Path, labels: str | Path | None = None, mode: str = "rank",
                      host: str = "127.0.0.1", port: int = 8765) -> BaseWSGIServer:
    """The threaded werkzeug server of :func:`create_app` bound to ``host:port`` (port 0: a free one), not yet
    serving; ``server.app`` is the app, ``server.server_port`` the real port."""
    if not 0 <= port <= 65535:
        raise DataError(f"--port {port}: must be 0..65535 (0 picks a free port)")
    # served beyond this machine (an explicit --host): it is reached by whatever name the network gives it
    loopback = host == "localhost" or (_is_ip(host) and ipaddress.ip_address(host).is_loopback)
    app = create_app(folder, labels, mode, hosts=[host] if loopback else ["*"])
    try:
        return make_server(host, port, app, threaded=True)
    except (OSError, SystemExit) as e:
        # werkzeug reports a port in use on stderr and calls sys.exit(1) from inside the constructor: a library
        # call must not end the process, and the label file's lock must go with the failed server
        close_app(app)
        reason = getattr(e, "strerror", None) or "in use, or not an address of this machine"
        raise DataError(f"--host {host} --port {port}: cannot listen there ({reason}); try another --port "
                        "(0 picks a free one)") from None


def page_url(server: BaseWSGIServer, annotator: str | None = None) -> str:
    """The address to open in a browser (with ``?annotator=`` when one is given)."""
    host = server.host if server.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    url = f"http://{host}:{server.server_port}/"
    return url + f"?annotator={quote(annotator)}" if annotator else url


def serve(folder: str | Path, labels: str | Path | None = None, mode: str = "rank", annotator: str | None = None,
          host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve the labelling page over ``folder`` until interrupted (Ctrl-C), printing the address to open."""
    if annotator is not None:
        try:
            check_annotator(annotator)
        except LabelError as e:
            raise DataError(f"--annotator: {e}") from None
    server = make_label_server(folder, labels, mode, host, port)
    store = label_store(server.app)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per image fetched drowns the rest
    print(f"labelling {folder} ({mode}); labels go to {store.path}\nopen {page_url(server, annotator)}  "
          "(Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        store.close()
