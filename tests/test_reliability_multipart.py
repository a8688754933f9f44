"""Issue 29 item 11: a malformed multipart body is answered 400 (as before) and logged as one line with a level and
the client, never the parser's bare "Expected boundary character 45, got 103 at index 2"."""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient
from tiny_models import tiny_env, tiny_plugin

from capcli.serve.app import ServeSettings, create_app


@pytest.fixture(scope="module")
def client(tmp_path_factory, small_synthetic):
    tmp = tmp_path_factory.mktemp("multipart")
    with tiny_plugin(tmp / "plugin"):
        bundle = tiny_env(tmp, small_synthetic)["bundle"]
        with TestClient(create_app(bundle, provider="cpu", settings=ServeSettings())) as client:
            yield client


@pytest.mark.parametrize("body", [b"--xyzboundary\r\nContent-Disposition: form-data; name=\"images\"\r\n\r\nab",
                                  b"-gxyz", b"--capcli\r\nContent-Disposition: form-data; name=\"images\"; "
                                            b"filename=\"a.png\"\r\n\r\n\x89PNG"])
def test_a_malformed_body_is_one_log_line_with_level_and_client(client, caplog, body):
    with caplog.at_level(logging.DEBUG):
        response = client.post("/v1/captions", content=body,
                               headers={"Content-Type": "multipart/form-data; boundary=capcli"})
    assert response.status_code == 400 and "multipart" in response.json()["error"], response.json()
    # pytest also sees the parser's own records, which go nowhere outside it (the test below)
    records = [r for r in caplog.records if r.levelno >= logging.INFO]
    ours = [r for r in records if r.name == "uvicorn.error"]
    assert len(ours) == 1 and "testclient" in ours[0].getMessage() and "multipart" in ours[0].getMessage(), \
        ([r.getMessage() for r in records], response.json())
    assert ours[0].levelname in ("INFO", "WARNING")


def test_the_parser_logs_nothing_on_its_own_outside_the_server():
    """What `capcli serve` showed: python-multipart's warning through logging's last-resort handler, bare."""
    import subprocess
    import sys

    code = ("import logging, capcli.serve.uploads; "
            "logging.getLogger('python_multipart.multipart').warning('Expected boundary character 45, got 103')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "Expected boundary" not in result.stderr, result.stderr
