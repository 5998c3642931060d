"""`diffalign label`'s JSON API through Flask's test client, over fake `diffalign sample` and `make-pairs` folders
(tiny PNGs, no models): labels, undo, annotators, resume, and every refused input."""

from __future__ import annotations

import json
import os
import re
import threading

import pytest
from PIL import Image

from diffalign.data.errors import DataError
from diffalign.labelling.items import read_items
from diffalign.labelling.server import close_app, create_app, label_store, make_label_server, page_url
from diffalign.labelling.store import LabelStore


def _png(path, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)


def make_sample_folder(root, prompts=3, per_prompt=3):
    """What `diffalign sample` writes (manifest.json + images; trajectories are not needed to label)."""
    entries = []
    for pid in range(prompts):
        images = [f"images/p{pid:05d}_{k}.png" for k in range(per_prompt)]
        for k, rel in enumerate(images):
            _png(root / rel, (40 * pid, 60 * k, 90))
        entries.append({"prompt_id": pid, "prompt": f"prompt <b>{pid}</b>", "images": images,
                        "trajectory": f"trajectories/p{pid:05d}.safetensors"})
    manifest = {"base": "tiny", "per_prompt": per_prompt, "steps": 2, "prompts": entries}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def make_pairs_folder(root, prompts=2, per_prompt=3, torn=True):
    """What `diffalign make-pairs` writes: scores.jsonl (one record per prompt) + make_pairs.json + images."""
    lines = []
    for pid in range(prompts):
        images = [f"images/p{pid:05d}_{k}.png" for k in range(per_prompt)]
        for k, rel in enumerate(images):
            _png(root / rel, (10, 50 * k, 30 * pid))
        lines.append(json.dumps({"prompt_id": pid, "prompt": f"make-pairs prompt {pid}", "images": images,
                                 "seeds": list(range(per_prompt)), "scores": {"shape_size": [0.1] * per_prompt}}))
    text = "\n".join(lines) + "\n" + ('{"prompt_id": 9, "prompt": "to' if torn else "")
    (root / "scores.jsonl").write_text(text)
    (root / "make_pairs.json").write_text(json.dumps({"base": "tiny", "per_prompt": per_prompt}))
    return root


@pytest.fixture
def sample(tmp_path):
    return make_sample_folder(tmp_path / "sample")


@pytest.fixture
def app(sample):
    app = create_app(sample)
    yield app
    close_app(app)


@pytest.fixture
def client(app):
    return app.test_client()


def post(client, body, **kw):
    return client.post("/api/labels", json=body, **kw)


def items(client, who="alice"):
    r = client.get(f"/api/items?annotator={who}")
    assert r.status_code == 200, r.get_json()
    return r.get_json()


# ----- folders -----
def test_read_items_of_both_layouts(sample, tmp_path):
    folder = read_items(sample)
    assert (folder.kind, folder.per_prompt, [i.prompt_id for i in folder.items]) == ("sample", 3, [0, 1, 2])
    assert folder.items[1].images == [f"images/p00001_{k}.png" for k in range(3)]
    pairs = read_items(make_pairs_folder(tmp_path / "mp"))  # the torn last record is skipped
    assert (pairs.kind, pairs.per_prompt, len(pairs.items)) == ("make-pairs", 3, 2)
    assert pairs.items[0].prompt == "make-pairs prompt 0"


def test_folder_errors_are_one_line(tmp_path, sample):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither manifest.json .* nor scores.jsonl"):
        read_items(tmp_path / "empty")
    (sample / "images" / "p00001_2.png").unlink()
    with pytest.raises(DataError, match="images/p00001_2.png of prompt 1 is missing"):
        read_items(sample)


def test_pair_mode_needs_two_images(sample, tmp_path):
    with pytest.raises(DataError, match="--mode pair needs exactly 2 images per prompt.*rank, best-worst or thumbs"):
        create_app(sample, mode="pair")
    app = create_app(make_sample_folder(tmp_path / "two", per_prompt=2), mode="pair")
    assert items(app.test_client())["mode"] == "pair"
    close_app(app)


# ----- the happy path -----
def test_label_progress_and_read_by_d3po(app, client, sample):
    from diffalign.sampling.human import read_labels

    first = items(client)
    assert (first["mode"], first["per_prompt"], first["total"], first["done"]) == ("rank", 3, 3, 0)
    assert [i["prompt_id"] for i in first["items"]] == [0, 1, 2]
    assert first["items"][0]["prompt"] == "prompt <b>0</b>"
    assert first["items"][0]["images"][2] == "/images/images/p00000_2.png"
    assert client.get(first["items"][0]["images"][2]).status_code == 200
    r = post(client, {"prompt_id": 1, "annotator": "alice", "scores": [2, 0, 1], "mode": "rank"})
    assert r.status_code == 200
    assert r.get_json() == {"prompt_id": 1, "annotator": "alice", "scores": [2, 0, 1], "mode": "rank"}
    after = items(client)
    assert after["done"] == 1 and [i["prompt_id"] for i in after["items"]] == [0, 2]
    assert post(client, {"prompt_id": 1, "annotator": "bob", "scores": [0, 1, 0.5]}).status_code == 200
    lines = (sample / "labels.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"prompt_id": 1, "annotator": "alice", "scores": [2, 0, 1], "mode": "rank"},
        {"prompt_id": 1, "annotator": "bob", "scores": [0, 1, 0.5]}]
    manifest = json.loads((sample / "manifest.json").read_text())
    means = read_labels(sample / "labels.jsonl", manifest)
    assert list(means) == [1] and means[1].tolist() == [1.0, 0.5, 0.75]


def test_undo_and_annotators_are_independent(client, sample):
    assert post(client, {"prompt_id": 0, "annotator": "alice", "scores": [1, 0, 0]}).status_code == 200
    assert post(client, {"prompt_id": 0, "annotator": "bob", "scores": [0, 0, 1]}).status_code == 200
    assert post(client, {"prompt_id": 2, "annotator": "alice", "scores": [0, 1, 0]}).status_code == 200
    assert items(client, "bob")["done"] == 1 and items(client, "carol")["done"] == 0
    r = client.delete("/api/labels/last?annotator=alice")
    assert r.status_code == 200 and r.get_json()["prompt_id"] == 2
    assert [i["prompt_id"] for i in items(client)["items"]] == [1, 2]
    assert [i["prompt_id"] for i in items(client, "bob")["items"]] == [1, 2]
    assert client.delete("/api/labels/last?annotator=alice").get_json()["prompt_id"] == 0
    r = client.delete("/api/labels/last?annotator=alice")
    assert r.status_code == 404 and "no label to undo" in r.get_json()["error"]
    assert [json.loads(x)["annotator"] for x in (sample / "labels.jsonl").read_text().splitlines()] == ["bob"]
    assert client.delete("/api/labels/last?annotator=").status_code == 400


def test_restart_resumes(app, client, sample):
    assert post(client, {"prompt_id": 0, "annotator": "alice", "scores": [1, 2, 3]}).status_code == 200
    close_app(app)
    again = create_app(sample)
    try:
        listed = items(again.test_client())
        assert listed["done"] == 1 and [i["prompt_id"] for i in listed["items"]] == [1, 2]
        # undo still reaches a label written before the restart
        assert again.test_client().delete("/api/labels/last?annotator=alice").get_json()["prompt_id"] == 0
    finally:
        close_app(again)


def test_make_pairs_folder_is_served(tmp_path):
    folder = make_pairs_folder(tmp_path / "mp")
    app = create_app(folder, labels=tmp_path / "out" / "mine.jsonl", mode="thumbs")
    try:
        client = app.test_client()
        listed = items(client)
        assert (listed["mode"], listed["total"]) == ("thumbs", 2)
        assert client.get(listed["items"][1]["images"][0]).status_code == 200
        assert post(client, {"prompt_id": 1, "annotator": "a.b-c_d e", "scores": [1, 0, 1], "mode": "thumbs"}).status_code == 200
        assert (tmp_path / "out" / "mine.jsonl").read_text().count("\n") == 1
    finally:
        close_app(app)


# ----- refused labels -----
@pytest.mark.parametrize(("body", "field"), [
    ({"prompt_id": 7, "annotator": "alice", "scores": [1, 0, 0]}, "prompt_id 7 is not a prompt"),
    ({"prompt_id": -1, "annotator": "alice", "scores": [1, 0, 0]}, "prompt_id -1"),
    ({"prompt_id": "0", "annotator": "alice", "scores": [1, 0, 0]}, "prompt_id must be an integer"),
    ({"prompt_id": True, "annotator": "alice", "scores": [1, 0, 0]}, "prompt_id must be an integer"),
    ({"prompt_id": 0.0, "annotator": "alice", "scores": [1, 0, 0]}, "prompt_id must be an integer"),
    ({"annotator": "alice", "scores": [1, 0, 0]}, "prompt_id must be an integer"),
    ({"prompt_id": 0, "annotator": "alice", "scores": [1, 0]}, "scores must be a list of 3 numbers.*got 2"),
    ({"prompt_id": 0, "annotator": "alice", "scores": [1, 0, 0, 1]}, "scores must be a list of 3"),
    ({"prompt_id": 0, "annotator": "alice", "scores": "1,0,0"}, "scores must be a list of 3"),
    ({"prompt_id": 0, "annotator": "alice"}, "scores must be a list of 3"),
    ({"prompt_id": 0, "annotator": "alice", "scores": [1, "0", 0]}, r"scores\[1\] must be a number"),
    ({"prompt_id": 0, "annotator": "alice", "scores": [1, None, 0]}, r"scores\[1\] must be a number"),
    ({"prompt_id": 0, "annotator": "alice", "scores": [True, False, 0]}, r"scores\[0\] must be a number"),
    ({"prompt_id": 0, "annotator": "alice", "scores": [1, 10**400, 0]}, r"scores\[1\] must be a finite"),
    ({"prompt_id": 0, "scores": [1, 0, 0]}, "annotator must be"),
    ({"prompt_id": 0, "annotator": "", "scores": [1, 0, 0]}, "annotator must be"),
    ({"prompt_id": 0, "annotator": "   ", "scores": [1, 0, 0]}, "annotator must be"),
    ({"prompt_id": 0, "annotator": "a" * 65, "scores": [1, 0, 0]}, "annotator must be"),
    ({"prompt_id": 0, "annotator": "al/ice", "scores": [1, 0, 0]}, "annotator must be"),
    ({"prompt_id": 0, "annotator": "<script>", "scores": [1, 0, 0]}, "annotator must be"),
    ({"prompt_id": 0, "annotator": 5, "scores": [1, 0, 0]}, "annotator must be"),
    ({"prompt_id": 0, "annotator": "alice", "scores": [1, 0, 0], "mode": "x y"}, "mode must be"),
    ({"prompt_id": 0, "annotator": "alice", "scores": [1, 0, 0], "extra": 1}, "unknown field.*'extra'"),
])
def test_bad_labels_are_400_naming_the_field(client, sample, body, field):
    r = post(client, body)
    assert r.status_code == 400 and r.is_json
    assert re.search(field, r.get_json()["error"]), r.get_json()
    assert not (sample / "labels.jsonl").exists() or (sample / "labels.jsonl").read_bytes() == b""


@pytest.mark.parametrize(("raw", "message"), [
    ('{"prompt_id": 0, "annotator": "alice", "scores": [1, NaN, 0]}', r"scores\[1\] must be a finite"),
    ('{"prompt_id": 0, "annotator": "alice", "scores": [Infinity, 0, 0]}', r"scores\[0\] must be a finite"),
    ('{"prompt_id": 0, "annotator": "alice", "scores": [1, 0, 0]', "malformed JSON"),
    ("", "malformed JSON"),
    ("not json", "malformed JSON"),
    ('[{"prompt_id": 0, "annotator": "alice", "scores": [1, 0, 0]}]', "must be a JSON object.*got list"),
    ('"hello"', "must be a JSON object"),
    (b'{"prompt_id": 0, "annotator": "\xff"}', "not UTF-8"),
])
def test_bad_bodies_are_400(client, sample, raw, message):
    r = client.post("/api/labels", data=raw, content_type="application/json")
    assert r.status_code == 400 and r.is_json
    assert re.search(message, r.get_json()["error"]), r.get_json()


def test_refused_posts_leave_the_file_byte_identical(client, sample):
    assert post(client, {"prompt_id": 0, "annotator": "alice", "scores": [1, 0, 0]}).status_code == 200
    before = (sample / "labels.jsonl").read_bytes()
    r = post(client, {"prompt_id": 0, "annotator": "alice", "scores": [0, 0, 1]})
    assert r.status_code == 409 and "undo that label first" in r.get_json()["error"]
    for body in ({"prompt_id": 1, "annotator": "alice", "scores": [1, 0]},
                 {"prompt_id": 5, "annotator": "alice", "scores": [1, 0, 0]}):
        assert post(client, body).status_code == 400
    assert client.post("/api/labels", data='{"prompt_id": 1, "scores": [NaN', content_type="application/json").status_code == 400
    assert (sample / "labels.jsonl").read_bytes() == before


def test_body_over_the_limit_is_413_json(sample):
    app = create_app(sample, max_body=1024)
    try:
        big = {"prompt_id": 0, "annotator": "alice", "scores": [0] * 3, "mode": "rank", "pad": "x" * 2000}
        r = app.test_client().post("/api/labels", json=big)
        assert r.status_code == 413 and "over 1024 bytes" in r.get_json()["error"]
        assert not (sample / "labels.jsonl").exists()
    finally:
        close_app(app)


def test_api_errors_are_json_not_html(client):
    for r in (client.get("/api/nothing"), client.put("/api/labels", json={}), client.get("/images/nope.png"),
              client.get("/api/items")):
        assert r.is_json and "error" in r.get_json() and b"<html" not in r.data.lower()


def test_the_page_and_its_assets(client):
    page = client.get("/")
    assert page.status_code == 200 and b"/assets/label.js" in page.data
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert b"https://" not in page.data  # no CDN: works offline
    for name, kind in (("label.js", "javascript"), ("label.css", "css")):
        r = client.get(f"/assets/{name}")
        assert r.status_code == 200 and kind in r.content_type and b"https://" not in r.data
    assert b"innerHTML" not in client.get("/assets/label.js").data
    assert client.get("/assets/../items.py").status_code == 404


def test_cross_site_writes_are_refused(client, sample):
    r = post(client, {"prompt_id": 0, "annotator": "alice", "scores": [1, 0, 0]}, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and not (sample / "labels.jsonl").exists()
    r = client.get("/api/items?annotator=alice", headers={"Host": "rebound.example:8765"})  # DNS rebinding
    assert r.status_code == 403 and "Host" in r.get_json()["error"]
    assert client.get("/api/items?annotator=alice", headers={"Host": "127.0.0.1:8765"}).status_code == 200
    assert client.get("/api/items?annotator=alice", headers={"Host": "[::1]:8765"}).status_code == 200
    r = post(client, {"prompt_id": 0, "annotator": "alice", "scores": [1, 0, 0]}, headers={"Origin": "http://localhost"})
    assert r.status_code == 200


# ----- images: only files inside the folder -----
def test_images_never_leave_the_folder(client, sample, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    (sample / "images" / "link.png").symlink_to(secret)
    (sample / "images" / "inner.png").symlink_to(sample / "images" / "p00000_0.png")
    for url in ("/images/../secret.txt", "/images/%2e%2e/secret.txt", "/images/images/%2E%2E/%2e%2e/secret.txt",
                f"/images/{secret}", f"/images//{secret}", "/images/%2F" + str(secret).lstrip("/"),
                "/images/images/link.png", "/images/images", "/images/images/missing.png",
                "/images/images/..%5c..%5csecret.txt"):
        r = client.get(url)
        assert r.status_code in (403, 404), url
        assert b"secret" not in r.data or b"error" in r.data, url
        assert r.data != b"secret", url
    assert client.get("/images/images/inner.png").status_code == 200  # a link that stays inside is fine


# ----- the label file -----
def test_a_second_server_on_the_same_file_is_refused(app, sample):
    with pytest.raises(DataError, match=r"is being served by another `diffalign label` \(lock .*labels.jsonl.lock"):
        create_app(sample)
    with pytest.raises(DataError, match="being served by another"):
        LabelStore(sample / "labels.jsonl", 3, [0, 1, 2])
    close_app(app)
    close_app(create_app(sample))  # free again once the first is closed


def test_a_torn_last_line_is_dropped_and_repaired(sample):
    good = '{"prompt_id": 0, "annotator": "alice", "scores": [1, 0, 0]}\n'
    (sample / "labels.jsonl").write_text(good + '{"prompt_id": 1, "annotator": "alice", "sco')
    app = create_app(sample)
    try:
        assert (sample / "labels.jsonl").read_text() == good  # repaired before the next append
        client = app.test_client()
        assert [i["prompt_id"] for i in items(client)["items"]] == [1, 2]
        assert post(client, {"prompt_id": 1, "annotator": "alice", "scores": [0, 1, 0]}).status_code == 200
        assert [json.loads(x)["prompt_id"] for x in (sample / "labels.jsonl").read_text().splitlines()] == [0, 1]
    finally:
        close_app(app)


def test_a_last_line_missing_only_its_newline_is_kept(sample):
    (sample / "labels.jsonl").write_text('{"prompt_id": 2, "annotator": "bob", "scores": [1, 0, 0], "note": "hand"}')
    with LabelStore(sample / "labels.jsonl", 3, [0, 1, 2]) as store:
        assert store.done("bob") == {2}
    assert (sample / "labels.jsonl").read_text().endswith('"note": "hand"}\n')


@pytest.mark.parametrize(("text", "message"), [
    ('not json\n{"prompt_id": 0, "annotator": "a", "scores": [1, 0, 0]}\n', "line 1: not valid JSON"),
    ('{"prompt_id": 0, "annotator": "a", "scores": [1, 0]}\n\n', "line 1: scores must be a list of 3"),
    ('{"prompt_id": 0, "annotator": "a", "scores": [1, 0, 0]}\n{"prompt_id": 8, "scores": [1, 0, 0]}\n',
     "line 2: prompt_id 8 is not a prompt"),
])
def test_invalid_lines_before_the_last_are_errors(sample, text, message):
    (sample / "labels.jsonl").write_text(text)
    with pytest.raises(DataError, match=message):
        create_app(sample)
    assert (sample / "labels.jsonl").read_text() == text  # not touched
    close_app(create_app(sample, labels=sample / "other.jsonl"))  # and its lock was released


def test_concurrent_posts_each_land_whole(app, sample):
    def label(who):
        client = app.test_client()
        for pid in range(3):
            assert post(client, {"prompt_id": pid, "annotator": who, "scores": [pid, 1, 2]}).status_code == 200

    threads = [threading.Thread(target=label, args=(f"a{n}",)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = (sample / "labels.jsonl").read_text().splitlines()
    assert len(lines) == 18 and len({(json.loads(x)["annotator"], json.loads(x)["prompt_id"]) for x in lines}) == 18
    assert label_store(app).done("a3") == {0, 1, 2}


def test_undo_rewrites_atomically(client, sample):
    for pid in range(3):
        post(client, {"prompt_id": pid, "annotator": "alice", "scores": [1, 0, 0]})
    inode = os.stat(sample / "labels.jsonl").st_ino
    client.delete("/api/labels/last?annotator=alice")
    assert os.stat(sample / "labels.jsonl").st_ino != inode  # a new file renamed into place, not an edit in place
    assert not [p for p in sample.iterdir() if p.name.endswith(".partial")]
    assert post(client, {"prompt_id": 2, "annotator": "alice", "scores": [0, 0, 1]}).status_code == 200


# ----- the server -----
def test_server_binds_localhost_by_default(sample):
    server = make_label_server(sample, port=0)
    try:
        assert server.host == "127.0.0.1" and server.server_address[0] == "127.0.0.1"
        assert server.server_port > 0
        assert page_url(server, "ann a") == f"http://127.0.0.1:{server.server_port}/?annotator=ann%20a"
    finally:
        server.server_close()
        close_app(server.app)


def test_serve_prints_the_address_and_releases_the_file(sample, monkeypatch, capsys):
    from werkzeug.serving import BaseWSGIServer

    from diffalign.labelling.server import serve

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(BaseWSGIServer, "serve_forever", interrupted)
    serve(sample, annotator="ann", port=0)
    assert re.search(r"open http://127\.0\.0\.1:\d+/\?annotator=ann ", capsys.readouterr().out)
    close_app(create_app(sample))  # the lock went with the server
    wide = make_label_server(sample, host="0.0.0.0", port=0)  # an explicit --host: any name reaches it
    try:
        assert wide.app.test_client().get("/api/items?annotator=a", headers={"Host": "labbox:1"}).status_code == 200
    finally:
        wide.server_close()
        close_app(wide.app)


def test_a_port_in_use_is_a_clear_error_and_releases_the_file(sample):
    taken = make_label_server(sample, labels=sample / "other.jsonl", port=0)
    try:
        with pytest.raises(DataError, match=rf"--port {taken.server_port}: cannot listen there"):
            make_label_server(sample, port=taken.server_port)
        close_app(create_app(sample))  # the failed server left no lock on labels.jsonl
    finally:
        taken.server_close()
        close_app(taken.app)


def test_serve_refuses_a_bad_annotator_or_port(sample):
    from diffalign.labelling.server import serve

    with pytest.raises(DataError, match="--annotator"):
        serve(sample, annotator="x/y")
    with pytest.raises(DataError, match="--port 70000"):
        serve(sample, port=70000)
    with pytest.raises(DataError, match="--mode 'ranking'"):
        serve(sample, mode="ranking", port=0)


def test_label_command_line(sample, monkeypatch):
    import argparse

    from diffalign.labelling import cli

    parser = argparse.ArgumentParser(prog="diffalign")
    label = cli.add_label_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["label", str(sample), "--mode", "thumbs", "--annotator", "ann", "--port", "0"])
    called = {}
    monkeypatch.setattr(cli, "serve", lambda *a, **kw: called.update(kw, folder=a[0]))
    args.func(args)
    assert called == {"folder": str(sample), "labels": None, "mode": "thumbs", "annotator": "ann",
                      "host": "127.0.0.1", "port": 0}
    text = " ".join(label.format_help().split())
    for flag in ("--mode", "--annotator", "--port", "--host", "--labels"):
        assert flag in text
    assert "default: 8765" in text and "default: 127.0.0.1" in text and "default: rank" in text
