"""The labelling page in a real headless Chromium (the system's, driven by Playwright; no browser download):
rank by clicks and by keys, undo, thumbs, and resuming after a server restart."""

from __future__ import annotations

import json
import random
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from diffalign.data.errors import DataError
from diffalign.labelling.server import close_app, make_label_server, page_url

playwright_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install -e '.[dev]')")


def _chromium() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    return found or next((p for p in ("/usr/bin/chromium", "/usr/lib/chromium/chromium") if Path(p).is_file()), None)


pytestmark = pytest.mark.skipif(_chromium() is None,
                                reason="no Chromium found (.ci/run installs Debian's chromium package)")


def make_sample_folder(root: Path, prompts: int = 3, per_prompt: int = 3) -> Path:
    """A `diffalign sample` folder: manifest.json and tiny PNGs."""
    entries = []
    for pid in range(prompts):
        images = [f"images/p{pid:05d}_{k}.png" for k in range(per_prompt)]
        for k, rel in enumerate(images):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 16), (80 * k, 60 * pid, 120)).save(root / rel)
        entries.append({"prompt_id": pid, "prompt": f"<img src=x onerror=alert(1)> prompt {pid}", "images": images})
    (root / "manifest.json").write_text(json.dumps({"per_prompt": per_prompt, "prompts": entries}))
    return root


def _server_on(folder: Path, mode: str, port: int):
    """A server on ``port``; a restart on the same port waits up to 5 s for the kernel to let the old one go."""
    deadline = time.monotonic() + 5
    while True:
        try:
            return make_label_server(folder, mode=mode, port=port)
        except DataError:
            if port == 0 or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _port_outside_the_ephemeral_range() -> int:
    """A free port under 32768, so no outgoing connection takes it while the test restarts its server."""
    for port in random.Random().sample(range(20000, 32000), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    return 0


class Running:
    """The real threaded server on a free port, in a thread."""

    def __init__(self, folder: Path, mode: str = "rank", port: int = 0) -> None:
        self.server = _server_on(folder, mode, port)
        self.port = self.server.server_port
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, annotator: str | None = None) -> str:
        return page_url(self.server, annotator)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        close_app(self.server.app)


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=_chromium(), headless=True, args=["--no-sandbox"])
        except playwright_api.Error as e:
            pytest.skip(f"Chromium at {_chromium()} does not start under Playwright: {str(e).splitlines()[0]}")
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(10_000)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("dialog", lambda d: (errors.append(f"dialog: {d.message}"), d.dismiss()))
    yield page
    context.close()
    assert not errors, errors  # no script error, and the prompt text never ran as HTML


def _lines(folder: Path) -> list[dict]:
    file = folder / "labels.jsonl"
    return [json.loads(x) for x in file.read_text().splitlines()] if file.exists() else []


def _showing(page, pid: int, progress: str) -> None:
    expect = playwright_api.expect
    expect(page.locator("body")).to_have_attribute("data-prompt-id", str(pid))
    expect(page.locator("body")).to_have_attribute("data-state", "ready")
    expect(page.locator("#progress")).to_have_text(progress)


def test_rank_by_clicks_and_keys_undo_and_resume(tmp_path, page):
    expect = playwright_api.expect
    folder = make_sample_folder(tmp_path / "sample")
    running = Running(folder, port=_port_outside_the_ephemeral_range())  # restarted on the same port below
    try:
        page.goto(running.url())  # no name yet: the page asks for one
        expect(page.locator("body")).to_have_attribute("data-state", "who")
        page.fill("#annotator", "ann")
        page.keyboard.press("Enter")
        _showing(page, 0, "0 / 3")
        expect(page.locator("#prompt")).to_have_text("<img src=x onerror=alert(1)> prompt 0")  # shown as text
        expect(page.locator("#keys")).to_contain_text("undo")

        # prompt 0 by clicks: image 3 best, then image 1; image 2 is placed last by itself
        cards = page.locator("#images .card")
        cards.nth(2).locator("button.pick").click()
        cards.nth(0).locator("button.pick").click()
        expect(cards.nth(1).locator(".badge")).to_have_text("#3 (worst)")
        page.click("#save")
        _showing(page, 1, "1 / 3")
        assert _lines(folder) == [{"prompt_id": 0, "annotator": "ann", "scores": [1, 0, 2], "mode": "rank"}]

        # prompt 1 by keys: 2 then 3 (1 is last), Enter saves
        page.keyboard.press("2")
        page.keyboard.press("3")
        expect(cards.nth(0).locator(".badge")).to_have_text("#3 (worst)")
        page.keyboard.press("Enter")
        _showing(page, 2, "2 / 3")
        assert _lines(folder)[-1] == {"prompt_id": 1, "annotator": "ann", "scores": [0, 2, 1], "mode": "rank"}

        # z undoes the last label and shows that prompt again
        page.keyboard.press("z")
        _showing(page, 1, "1 / 3")
        expect(page.locator("#status")).to_contain_text("undone: prompt 1")
        assert _lines(folder) == [{"prompt_id": 0, "annotator": "ann", "scores": [1, 0, 2], "mode": "rank"}]
    finally:
        running.stop()

    # a new server on the same file and port (the remembered name is per origin): the page resumes at prompt 1
    running = Running(folder, port=running.port)
    try:
        page.goto(running.url())
        expect(page.locator("#annotator")).to_have_value("ann")
        _showing(page, 1, "1 / 3")
        page.click("#undo")  # the undo button reaches the label written before the restart
        _showing(page, 0, "0 / 3")
        assert _lines(folder) == []
        page.goto(running.url("bea"))  # another annotator, from the printed address
        _showing(page, 0, "0 / 3")
        page.keyboard.press("z")
        expect(page.locator("#status")).to_have_text("nothing to undo")
    finally:
        running.stop()


def test_thumbs_by_keys_and_clicks(tmp_path, page):
    folder = make_sample_folder(tmp_path / "sample", prompts=2)
    running = Running(folder, mode="thumbs")
    try:
        page.goto(running.url("tess"))
        _showing(page, 0, "0 / 2")
        page.keyboard.press("u")  # image 1 up, cursor to image 2
        page.keyboard.press("ArrowDown")  # image 2 down
        playwright_api.expect(page.locator("#save")).to_be_disabled()
        page.locator("#images .card").nth(2).locator(".up-button").click()
        page.keyboard.press("Enter")
        _showing(page, 1, "1 / 2")
        page.keyboard.press("3")  # cursor to image 3
        page.keyboard.press("d")
        page.keyboard.press("ArrowLeft")
        page.keyboard.press("ArrowLeft")
        page.keyboard.press("d")
        page.keyboard.press("u")
        page.keyboard.press("Enter")
        playwright_api.expect(page.locator("body")).to_have_attribute("data-state", "finished")
        playwright_api.expect(page.locator("#progress")).to_have_text("2 / 2")
        assert _lines(folder) == [{"prompt_id": 0, "annotator": "tess", "scores": [1, 0, 1], "mode": "thumbs"},
                                  {"prompt_id": 1, "annotator": "tess", "scores": [0, 1, 0], "mode": "thumbs"}]
    finally:
        running.stop()


def test_best_worst_and_pair(tmp_path, page):
    expect = playwright_api.expect
    folder = make_sample_folder(tmp_path / "bw", prompts=1, per_prompt=4)
    running = Running(folder, mode="best-worst")
    try:
        page.goto(running.url("bo"))
        _showing(page, 0, "0 / 1")
        page.keyboard.press("3")  # best
        page.locator("#images .card").nth(0).locator("button.pick").click()  # worst
        expect(page.locator("#images .card").nth(0).locator(".badge")).to_have_text("worst")
        page.keyboard.press("Enter")
        expect(page.locator("body")).to_have_attribute("data-state", "finished")
        assert _lines(folder) == [{"prompt_id": 0, "annotator": "bo", "scores": [0, 0.5, 1, 0.5], "mode": "best-worst"}]
    finally:
        running.stop()
    folder = make_sample_folder(tmp_path / "pair", prompts=3, per_prompt=2)
    running = Running(folder, mode="pair")
    try:
        page.goto(running.url("pat"))
        _showing(page, 0, "0 / 3")
        page.keyboard.press("ArrowRight")  # saved at once
        _showing(page, 1, "1 / 3")
        page.keyboard.press("t")
        _showing(page, 2, "2 / 3")
        page.locator("#images .card").nth(0).locator("button.pick").click()
        expect(page.locator("body")).to_have_attribute("data-state", "finished")
        assert [x["scores"] for x in _lines(folder)] == [[0, 1], [0.5, 0.5], [1, 0]]
    finally:
        running.stop()
