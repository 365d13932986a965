"""The browser tool's MCP server over a local full-text index, driven by MCP's own client over SSE as vLLM drives
it; the index built by the CLI from a folder of documents; the HTTP backend against a search service on a real
socket."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gptoss_vllm.bench.process import free_port, start_tool_server
from gptoss_vllm.tools.search_index import HttpSearch, LocalIndex

DOCS = {
    "gpt-oss/mxfp4.md": "# MXFP4 experts\n\nThe MoE experts of gpt-oss are quantised to MXFP4: blocks of 32 "
    "values share one E8M0 scale.\n\nEach value is an E2M1 nibble.\n"
    + "Filler line about nothing.\n" * 60
    + "The quokka paragraph sits at the end of this page.\n",
    "gpt-oss/harmony.md": "# The harmony format\n\nChannels: analysis, commentary and final. Tools are declared in "
    "the system and developer messages.\n",
    "ops/scaling.txt": "Scaling pools\n\nA pool scales on the engines' waiting requests or on KV-cache use.\n",
    "ops/alerts.html": "<html><head><title>Alert rules</title><style>p {color: red}</style></head><body>"
    "<h1>Alerts</h1><p>The TTFT burn-rate alert pages the on-call.</p><script>var x = 'hidden';</script>"
    "</body></html>",
    "ops/ignored.bin": "not a document",
}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gptoss_vllm.cli", "tools", *args], capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("browser")
    for name, body in DOCS.items():
        path = root / "docs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body)
    built = _cli("index", str(root / "docs"), "--out", str(root / "index.db"))
    assert built.returncode == 0, built.stderr
    assert "indexed 4 documents" in built.stdout
    return root / "index.db"


class BrowserServer:
    def __init__(self, url: str) -> None:
        self.url = url

    def call(self, tool: str, session: str = "s-1", **args: Any) -> Any:
        async def go() -> Any:
            from mcp import ClientSession
            from mcp.client.sse import sse_client

            async with (
                sse_client(url=f"{self.url}/sse", headers={"x-session-id": session}) as streams,
                ClientSession(*streams) as client,
            ):
                await client.initialize()
                return await client.call_tool(tool, args)

        return asyncio.run(go())

    def describe(self) -> tuple[Any, Any]:
        async def go() -> tuple[Any, Any]:
            from mcp import ClientSession
            from mcp.client.sse import sse_client

            async with sse_client(url=f"{self.url}/sse") as streams, ClientSession(*streams) as client:
                return await client.initialize(), await client.list_tools()

        return asyncio.run(go())


@pytest.fixture(scope="module")
def browser(index: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrowserServer]:
    log = tmp_path_factory.mktemp("browser-log") / "server.log"
    running = start_tool_server("browser", log, ["--index", str(index)])
    yield BrowserServer(running.url)
    running.stop(timeout_s=30)


def text(result: Any) -> str:
    return result.content[0].text


def test_the_server_is_harmonys_browser_namespace(browser):
    from openai_harmony import ToolNamespaceConfig

    init, tools = browser.describe()
    assert init.server_info.name == "browser"
    assert init.instructions == ToolNamespaceConfig.browser().description
    listed = {tool.name: tool for tool in tools.tools}
    assert {"search", "open", "find"} <= set(listed)
    assert set(listed["open"].input_schema["properties"]) >= {"id", "cursor", "loc", "num_lines"}
    assert listed["search"].input_schema["required"] == ["query"]


def test_search_finds_the_document_and_open_shows_it_with_numbered_lines(browser):
    found = browser.call("search", query="which scale do MXFP4 blocks share", topn=3)
    assert not found.is_error
    first = text(found).splitlines()
    assert first[0] == "[0] Search results for `which scale do MXFP4 blocks share`"
    assert "【0†MXFP4 experts†doc:gpt-oss/mxfp4.md】" in text(found)
    opened = browser.call("open", id=0, cursor=0)
    assert not opened.is_error
    assert text(opened).startswith("[1] MXFP4 experts (doc:gpt-oss/mxfp4.md)\n**viewing lines [0 - ")
    assert "L2: The MoE experts of gpt-oss are quantised to MXFP4" in text(opened)
    # find on the open page, then scroll to the match.
    hit = browser.call("find", pattern="quokka")
    assert not hit.is_error and "match at L" in text(hit)
    line = int(text(hit).split("match at L")[1].split("】")[0])
    scrolled = browser.call("open", cursor=1, loc=line, num_lines=1)
    assert f"L{line}: The quokka paragraph sits at the end of this page." in text(scrolled)
    # A URL opens directly; the HTML page is its text, without its script or style.
    page = browser.call("open", id="doc:ops/alerts.html")
    assert "Alert rules" in text(page) and "burn-rate alert" in text(page)
    assert "hidden" not in text(page) and "color" not in text(page)


def test_what_is_not_there_is_a_tool_error_and_sessions_keep_their_own_pages(browser):
    missing = browser.call("open", id="doc:nope.md", session="t")
    assert missing.is_error and "doc:nope.md: no such document" in text(missing)
    fresh = browser.call("find", pattern="x", session="u")
    assert fresh.is_error and "no page is open yet" in text(fresh)
    browser.call("search", query="harmony channels", session="u")
    bad_link = browser.call("open", id=7, session="u")
    assert bad_link.is_error and "no link 7" in text(bad_link)
    nothing = browser.call("search", query="zebra xylophone", session="u")
    assert not nothing.is_error and "No results" in text(nothing)
    assert not browser.call("cleanup_session", session="u").is_error
    assert "no page is open yet" in text(browser.call("find", pattern="x", session="u"))
    metrics = httpx.get(f"{browser.url}/metrics", timeout=5).text
    assert 'gptoss_tool_calls_total{outcome="not_found",tool="open"}' in metrics
    assert 'gptoss_tool_calls_total{outcome="ok",tool="search"}' in metrics


def test_a_failed_index_build_keeps_the_previous_index(index, tmp_path):
    copy = tmp_path / "index.db"
    copy.write_bytes(index.read_bytes())
    (tmp_path / "empty").mkdir()
    refused = _cli("index", str(tmp_path / "empty"), "--out", str(copy))
    assert refused.returncode == 2 and "no .md, .markdown, .txt, .html, .htm files" in refused.stderr
    assert LocalIndex(copy).count == 4
    assert list(tmp_path.glob("*.building")) == []
    assert _cli("browser", "--index", str(tmp_path / "nope.db")).returncode == 2
    both = _cli("browser", "--index", str(copy), "--search-url", "http://x")
    assert both.returncode == 2 and "exactly one" in both.stderr


def test_the_http_backend_speaks_to_a_search_service(index):
    """A search service on a real socket, answering the two GETs from the local index."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    local = LocalIndex(index)

    async def search(request: Any) -> JSONResponse:
        hits = local.search(request.query_params["q"], int(request.query_params["n"]))
        return JSONResponse({"results": [h.__dict__ for h in hits]})

    async def document(request: Any) -> JSONResponse:
        doc = local.document(request.query_params["url"])
        return JSONResponse(doc.__dict__) if doc else JSONResponse({"error": "no"}, status_code=404)

    port = free_port()
    service = uvicorn.Server(
        uvicorn.Config(Starlette(routes=[Route("/search", search), Route("/document", document)]), port=port)
    )
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    try:
        while not service.started:
            time.sleep(0.05)
        remote = HttpSearch(f"http://127.0.0.1:{port}/")
        (hit,) = remote.search("burn-rate alert", 1)
        assert (hit.url, hit.title) == ("doc:ops/alerts.html", "Alert rules")
        assert remote.document(hit.url).text == local.document(hit.url).text
        assert remote.document("doc:nope") is None
    finally:
        service.should_exit = True
        thread.join(timeout=10)
