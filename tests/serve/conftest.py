"""The shared ``stack`` of serve's stack tests (``tests/support/shared_stack.py``), started once for the folder and
stopped when its last test is done (tests marked ``stops_stack`` run last here), its OTLP receiver, and the
clients the tests share."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.support import http
from tests.support.otlp_receiver import OtlpReceiver
from tests.support.shared_stack import MAIN_KEY, start_shared_stack


@pytest.fixture(scope="package")
def otlp_receiver():
    running = OtlpReceiver()
    yield running
    running.close()


@pytest.fixture(scope="package")
def stack(tmp_path_factory, otlp_receiver):
    running = start_shared_stack(tmp_path_factory.mktemp("stack"), otlp_receiver.endpoint)
    yield running
    running.stop()
    running.redis.stop()
    running.python_tool.stop()
    with pytest.raises(httpx.HTTPError):  # Ctrl-C stopped Prometheus too
        http.get(f"{running.prometheus_url}/-/ready", timeout=2)


@pytest.fixture(scope="module")
def client(stack):
    """The official ``openai`` client with the main key, no retries."""
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=MAIN_KEY, max_retries=0, timeout=120)
