"""`capcli serve`: the HTTP API against the pipeline's own captions, bad uploads, micro-batching, load."""

import ast
import concurrent.futures
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from serve_helpers import PHOTOS, bad_uploads, rss_mb, running_server
from typer.testing import CliRunner

from capcli.bundle.manifest import read_manifest
from capcli.cli import app as cli_app
from capcli.runtime.captioner import Sampling, caption_images, open_captioner
from capcli.serve import batcher as batcher_module
from capcli.serve.app import ServeSettings, create_app, hypothesis_json, image_result, public_manifest
from capcli.serve.batcher import DecodeOptions, MicroBatcher, ServerBusy

ROOT = Path(__file__).parents[1]
SETTINGS = ServeSettings(max_files=4, max_image_bytes=300_000, max_wait_ms=20)
CLI_LIMITS = ("--max-files", "4", "--max-image-mb", "0.3")


@pytest.fixture(scope="module")
def captioner(exported_tiny):
    return open_captioner(exported_tiny, "onnx", provider="cpu")


@pytest.fixture(scope="module")
def client(exported_tiny):
    with TestClient(create_app(exported_tiny, provider="cpu", settings=SETTINGS)) as c:
        yield c


def expected(captioner, path: Path, **kwargs):
    return caption_images(captioner, [path], **kwargs)[0]


def post_photo(post, path: Path, **options) -> httpx.Response:
    return post("/v1/captions", files={"images": (path.name, path.read_bytes(), "image/jpeg")},
                data={k: str(v) for k, v in options.items()})


def test_a_photo_gets_the_caption_the_pipeline_gives(client, captioner):
    response = post_photo(client.post, PHOTOS[0], beam_size=3, n_best=3)
    assert response.status_code == 200, response.text
    body = response.json()
    result = body["results"][0]
    want = expected(captioner, PHOTOS[0], beam_size=3, n_best=3)
    assert result["filename"] == PHOTOS[0].name and result["caption"] == want.caption
    assert result["score"] == pytest.approx(want.score, abs=1e-4)
    assert [a["caption"] for a in result["alternatives"]] == [c for c, _ in want.alternatives]
    scores = [a["score"] for a in result["alternatives"]]
    # Up to n_best: the finished beams (the repetition block can keep a beam from ending within max_len).
    assert scores == sorted(scores, reverse=True) and 1 <= len(scores) <= 3
    assert set(body["timings_ms"]) == {"read", "queue", "encode", "decode", "total"}
    assert body["options"]["beam_size"] == 3 and body["batch_images"] >= 1


def test_several_photos_in_one_request_come_back_in_order(client, captioner):
    files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in PHOTOS]
    response = client.post("/v1/captions", files=files, data={"beam_size": "1"})
    assert response.status_code == 200, response.text
    got = [(r["filename"], r["caption"]) for r in response.json()["results"]]
    want = [(p.name, r.caption) for p, r in zip(PHOTOS, caption_images(captioner, PHOTOS, beam_size=1), strict=True)]
    assert got == want


def test_sampling_is_seeded_like_the_cli(client, captioner):
    options = {"sample": "true", "temperature": "1.5", "top_k": "5", "seed": "11"}
    first = post_photo(client.post, PHOTOS[1], **options).json()["results"][0]["caption"]
    again = post_photo(client.post, PHOTOS[1], **options).json()["results"][0]["caption"]
    want = expected(captioner, PHOTOS[1], sampling=Sampling(temperature=1.5, top_k=5, seed=11)).caption
    assert first == again == want


def test_model_health_docs_and_page(client, exported_tiny):
    model = client.get("/v1/model").json()
    assert model["manifest"] == public_manifest(read_manifest(exported_tiny))
    assert model["providers"] == ["CPUExecutionProvider"]
    assert model["limits"]["max_files"] == SETTINGS.max_files
    assert client.get("/healthz").json()["status"] == "ok"
    assert "swagger" in client.get("/docs").text.lower()
    form = client.get("/openapi.json").json()["paths"]["/v1/captions"]["post"]["requestBody"]["content"]
    assert {"images", "beam_size", "n_best", "sample"} <= set(form["multipart/form-data"]["schema"]["properties"])
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text and "cdn" not in page.text.lower()
    for asset in ("app.js", "style.css"):
        assert client.get(f"/static/{asset}").status_code == 200


@pytest.mark.parametrize("case", list(bad_uploads(SETTINGS.max_image_bytes, SETTINGS.max_files,
                                                  SETTINGS.max_body_bytes)))
def test_bad_uploads_get_a_4xx_json_error_naming_the_problem(client, case):
    request, status, phrase = bad_uploads(SETTINGS.max_image_bytes, SETTINGS.max_files,
                                          SETTINGS.max_body_bytes)[case]
    response = client.post("/v1/captions", **request)
    assert response.status_code == status, response.text
    assert phrase in response.json()["error"]
    assert client.get("/healthz").status_code == 200


def test_a_streamed_body_without_a_length_is_cut_off_at_the_limit(client):
    def chunks():
        for _ in range(SETTINGS.max_body_bytes // 65536 + 2):
            yield b"\0" * 65536

    response = client.post("/v1/captions", content=chunks(),
                           headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert response.status_code == 413 and "request body too large" in response.json()["error"]
    assert client.get("/healthz").status_code == 200


def test_hypotheses_with_attention_pass_through_as_json():
    weights = np.full((3, 4), 0.25, np.float32)
    assert hypothesis_json(("a cat", np.float32(-0.5))) == {"caption": "a cat", "score": -0.5}
    assert hypothesis_json(("a cat", -0.5, weights)) == {"caption": "a cat", "score": -0.5,
                                                          "attention": weights.tolist()}
    assert hypothesis_json({"caption": "a cat", "score": -0.5, "attention": weights}) == {
        "caption": "a cat", "score": -0.5, "attention": weights.tolist()}
    result = image_result("cat.jpg", [("a cat", -0.5, weights), ("a dog", -0.9, weights)])
    assert result["attention"] == weights.tolist() and [a["caption"] for a in result["alternatives"]] == [
        "a cat", "a dog"]


def test_an_attention_bundle_answers_each_words_weights_over_its_grid(tiny_attention_run, tmp_path):
    from capcli.bundle.build import export

    bundle = export(tiny_attention_run, tmp_path / "attention")
    captioner = open_captioner(bundle, "onnx", provider="cpu")
    want = caption_images(captioner, PHOTOS[:1], beam_size=3, attention=True)[0]
    with TestClient(create_app(bundle, provider="cpu", settings=SETTINGS)) as attention_client:
        response = post_photo(attention_client.post, PHOTOS[0], beam_size=3, n_best=2)
        grid = attention_client.get("/v1/model").json()["manifest"]["grid"]
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    assert result["caption"] == want.caption
    positions = grid["height"] * grid["width"]
    # one map per caption word (and one for the end token when the caption ended before max_len), each a
    # distribution over the grid
    words = [w for w, _ in want.attention]
    assert words in (want.caption.split(), want.caption.split() + ["<end>"])
    assert len(result["attention"]) == len(words)
    for got, (_word, alpha) in zip(result["attention"], want.attention, strict=True):
        assert len(got) == positions and sum(got) == pytest.approx(1.0, abs=1e-3)
        np.testing.assert_allclose(got, alpha, atol=1e-4)
    assert all(len(a["attention"]) - len(a["caption"].split()) in (0, 1) for a in result["alternatives"])


# ---------------------------------------------------------------------------------------------------------
# the micro-batcher, with a stand-in model whose "caption" of an image is the image's id


class _IdCaptioner:
    def __init__(self):
        self.batches = []

    def encode(self, images):
        self.batches.append(len(images))
        return images[:, 0, 0, 0]


@pytest.fixture
def id_batcher(monkeypatch):
    def decode(_captioner, state, beam_size, n_best=1, sampling=None, context=(), attention=False, guards=None,
               bias=None, required=None):
        assert len(context) == 0 and not attention  # a pooled stand-in has no per-image context
        tag = "sampled" if sampling else f"beam{beam_size}"
        return [[(f"{tag}:{int(v)}", float(v))] for v in state]

    monkeypatch.setattr(batcher_module, "decode_states", decode)
    model = _IdCaptioner()
    batcher = MicroBatcher(model, max_batch=8, max_wait=0.3, max_queued=20)
    batcher.start()
    yield batcher, model
    batcher.stop()


def _ids(*ids: int) -> np.ndarray:
    images = np.zeros((len(ids), 3, 2, 2), np.float32)
    images[:, 0, 0, 0] = ids
    return images


def test_concurrent_jobs_share_one_run_and_each_gets_its_own_answer(id_batcher):
    batcher, model = id_batcher
    beam = DecodeOptions(beam_size=3)
    futures = [batcher.submit(_ids(2 * i, 2 * i + 1), beam) for i in range(4)]
    answers = [f.result(timeout=10) for f in futures]
    assert [[h[0][0] for h in a.hypotheses] for a in answers] == [[f"beam3:{2 * i}", f"beam3:{2 * i + 1}"]
                                                                  for i in range(4)]
    assert model.batches == [8] and all(a.batch_images == 8 for a in answers)


def test_batches_are_bounded_and_grouped_by_options(id_batcher):
    batcher, model = id_batcher
    jobs = [(_ids(i), DecodeOptions(beam_size=1 + i % 2)) for i in range(6)]
    jobs += [(_ids(10 + i), DecodeOptions(sample=True, seed=1)) for i in range(2)]
    jobs.append((_ids(*range(20, 29)), DecodeOptions(beam_size=1)))  # 9 images: more than max_batch
    futures = [batcher.submit(images, options) for images, options in jobs]
    answers = [f.result(timeout=10) for f in futures]
    assert [a.hypotheses[0][0][0] for a in answers[:8]] == [f"beam{1 + i % 2}:{i}" for i in range(6)] + [
        "sampled:10", "sampled:11"]
    assert [h[0][0] for h in answers[8].hypotheses] == [f"beam1:{i}" for i in range(20, 29)]
    assert max(model.batches) <= 8 and sum(model.batches) == 17
    # sampled jobs are never merged (their random draws would depend on the company they keep)
    assert all(a.batch_images == 1 for a in answers[6:8])


def test_a_failing_batch_fails_its_jobs_and_the_batcher_goes_on(id_batcher):
    batcher, model = id_batcher
    with pytest.raises(IndexError):
        batcher.submit(np.zeros((1, 0, 2, 2), np.float32), DecodeOptions()).result(timeout=10)
    assert batcher.submit(_ids(5), DecodeOptions()).result(timeout=10).hypotheses == [[("beam3:5", 5.0)]]
    assert batcher.queued_images == 0


def test_too_many_waiting_images_is_busy(monkeypatch):
    gate = threading.Event()

    class Slow(_IdCaptioner):
        def encode(self, images):
            gate.wait(10)
            return super().encode(images)

    monkeypatch.setattr(batcher_module, "decode_states", lambda c, s, *a, **k: [[("x", 0.0)] for _ in s])
    batcher = MicroBatcher(Slow(), max_batch=4, max_wait=0, max_queued=6)
    batcher.start()
    try:
        first = batcher.submit(_ids(1, 2, 3, 4), DecodeOptions())
        with pytest.raises(ServerBusy, match="server busy"):
            batcher.submit(_ids(5, 6, 7), DecodeOptions())
        gate.set()
        assert len(first.result(timeout=10).hypotheses) == 4
    finally:
        gate.set()
        batcher.stop()


# ---------------------------------------------------------------------------------------------------------
# the real command on 127.0.0.1


@pytest.fixture(scope="module")
def server(exported_tiny):
    # A batch cap that 16 clients reach in the first round, so the memory a full batch needs is in use before
    # the load test measures growth.
    with running_server(exported_tiny, *CLI_LIMITS, "--max-wait-ms", "10", "--max-batch", "8") as (url, proc):
        yield url, proc


@pytest.fixture(scope="module")
def truth(captioner):
    """What the pipeline itself says for each photo (beam 3), by file name."""
    return {p.name: expected(captioner, p, beam_size=3) for p in PHOTOS}


def _caption_loop(url: str, jobs: list[Path]) -> list[tuple[str, int, dict]]:
    answers = []
    with httpx.Client(base_url=url, timeout=120) as http:
        for path in jobs:
            response = post_photo(http.post, path, beam_size=3)
            answers.append((path.name, response.status_code, response.json()))
    return answers


def _check_answers(answers, truth) -> None:
    for name, status, body in answers:
        assert status == 200, body
        result = body["results"][0]
        assert result["caption"] == truth[name].caption, (name, result)
        assert result["score"] == pytest.approx(truth[name].score, abs=1e-3)


def test_load_16_clients_all_answers_right_and_memory_bounded(server, truth):
    url, proc = server
    clients, per_client, rounds = 16, 6, 2
    plans = [[PHOTOS[(c + i) % len(PHOTOS)] for i in range(per_client)] for c in range(clients)]
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        def load_round():
            answers = [a for answers in pool.map(lambda plan: _caption_loop(url, plan), plans) for a in answers]
            assert len(answers) == clients * per_client
            _check_answers(answers, truth)
            return answers

        # The first round under full load sizes ONNX Runtime's arena and the allocator's per-thread pools for the
        # largest batches; a leak shows as growth across the rounds after it.
        answers = load_round()
        after_warm_up = rss_mb(proc.pid)
        for _ in range(rounds):
            answers += load_round()
    assert max(body["batch_images"] for _, _, body in answers) > 1, "concurrent requests were never batched"
    grown = rss_mb(proc.pid) - after_warm_up
    measured = rounds * clients * per_client
    assert grown < 50, f"server memory grew {grown:.0f} MB over {measured} requests after a warm-up round"
    assert proc.poll() is None


def test_bad_uploads_while_good_requests_are_in_flight(server, truth):
    url, proc = server
    max_body = ServeSettings(max_files=4, max_image_bytes=300_000).max_body_bytes
    cases = bad_uploads(300_000, 4, max_body)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        good = [pool.submit(_caption_loop, url, PHOTOS * 3) for _ in range(6)]
        with httpx.Client(base_url=url, timeout=120) as http:
            for name, (request, status, phrase) in cases.items():
                response = http.post("/v1/captions", **request)
                assert response.status_code == status, (name, response.text)
                assert phrase in response.json()["error"], name
        for future in good:
            _check_answers(future.result(timeout=300), truth)
    assert httpx.get(f"{url}/healthz").json()["status"] == "ok" and proc.poll() is None


def test_serve_refuses_a_folder_that_is_not_a_bundle_in_one_line(tmp_path):
    result = CliRunner().invoke(cli_app, ["serve", str(tmp_path)])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and "not a capcli bundle" in lines[0], result.stderr


def test_serve_on_a_port_in_use_is_one_line(exported_tiny):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(cli_app, ["serve", str(exported_tiny), "--port", str(port), "--provider", "cpu"])
    assert result.exit_code == 1
    assert result.stderr.strip().startswith(f"error: cannot listen on 127.0.0.1:{port}"), result.stderr


def _imports(*paths: Path) -> set[str]:
    found = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
    return found


def test_front_ends_do_not_import_each_other():
    server = _imports(*(ROOT / "capcli" / "serve").rglob("*.py"))
    assert not {m for m in server if m.startswith(("capcli.cli", "capcli.demo"))}, server
    cli_and_demo = [p for p in (ROOT / "capcli" / "cli").glob("*.py") if p.name != "serve.py"]
    assert not {m for m in _imports(*cli_and_demo, ROOT / "capcli" / "demo.py") if m.startswith("capcli.serve")}
    # `capcli serve` reaches the server only when it runs: importing the CLI loads neither it nor fastapi
    code = "import sys, capcli.cli; print(sorted(m for m in sys.modules if m.startswith(('capcli.serve', 'fastapi'))))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert loaded.stdout.strip() == "[]", loaded.stderr


@pytest.fixture
def reader_batcher(monkeypatch, id_batcher):
    """An id batcher that, like the server's, waits only for requests still being read; max_wait is long, so a
    batch that waited for nobody is seen at once."""
    _, model = id_batcher
    batcher = MicroBatcher(model, max_batch=8, max_wait=5.0, max_queued=20, wait_for_readers=True)
    batcher.start()
    yield batcher, model
    batcher.stop()


def test_a_lone_request_is_not_kept_waiting(reader_batcher):
    batcher, model = reader_batcher
    started = time.perf_counter()
    assert batcher.submit(_ids(1), DecodeOptions()).result(timeout=10).hypotheses == [[("beam3:1", 1.0)]]
    assert time.perf_counter() - started < 2.5  # not the 5 s of max_wait


def test_a_batch_waits_for_a_request_still_being_read(reader_batcher):
    batcher, model = reader_batcher
    started = time.perf_counter()
    with batcher.reading() as reading:
        first = batcher.submit(_ids(1), DecodeOptions())
        time.sleep(0.3)  # the second request's upload is still arriving
        second = reading.submit(_ids(2), DecodeOptions())
    answers = [first.result(timeout=10), second.result(timeout=10)]
    assert model.batches == [2] and [a.batch_images for a in answers] == [2, 2]
    assert time.perf_counter() - started < 2.5  # it went as soon as the second arrived


def test_a_request_that_fails_while_being_read_is_not_waited_for(reader_batcher):
    batcher, model = reader_batcher
    started = time.perf_counter()
    with pytest.raises(ValueError), batcher.reading():
        first = batcher.submit(_ids(1), DecodeOptions())
        time.sleep(0.3)
        raise ValueError("not an image")
    assert first.result(timeout=10).batch_images == 1 and model.batches == [1]
    assert time.perf_counter() - started < 2.5


def test_the_guards_are_options_as_in_the_cli(client, captioner):
    from capcli.runtime.captioner import Guards

    for options, guards in (({}, Guards()), ({"allow_unk": "true", "no_repeat_ngram": "0"}, Guards(False, 0)),
                            ({"no_repeat_ngram": "1"}, Guards(True, 1))):
        response = post_photo(client.post, PHOTOS[2], beam_size=3, **options)
        assert response.status_code == 200, response.text
        assert response.json()["results"][0]["caption"] == expected(captioner, PHOTOS[2], guards=guards).caption
    refused = post_photo(client.post, PHOTOS[2], no_repeat_ngram=-1)
    assert refused.status_code == 422 and "no_repeat_ngram" in refused.json()["error"]
