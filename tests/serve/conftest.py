"""The shared ``stack`` of serve's stack tests (``tests/support/shared_stack.py``), started once for the folder and
stopped when its last test is done (tests marked ``stops_stack`` run last here), and the clients the tests share."""

from __future__ import annotations

import openai
import pytest

from tests.support.shared_stack import MAIN_KEY, start_shared_stack


@pytest.fixture(scope="package")
def stack(tiny_checkpoint_dirs, tmp_path_factory):
    running = start_shared_stack(tiny_checkpoint_dirs["mxfp4"], tmp_path_factory.mktemp("stack"))
    yield running
    running.stop()
    running.redis.stop()


@pytest.fixture(scope="module")
def client(stack):
    """The official ``openai`` client with the main key, no retries."""
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=MAIN_KEY, max_retries=0, timeout=120)
