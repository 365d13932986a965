"""The browser tool's search backends: a local full-text index (SQLite FTS5) built from a folder of documents,
and the operator's own search service over HTTP, behind one interface (:class:`SearchBackend`).

The local index is what the embedded default and the tests use: ``gptoss-vllm tools index DOCS --out FILE``
reads every ``.md``, ``.txt`` and ``.html`` file under ``DOCS`` (HTML reduced to its text) and writes one SQLite
file, atomically: a failed build leaves the previous index as it was. A document's URL is ``doc:<path under
DOCS>``; its title is its first Markdown heading, its HTML ``<title>``, or its file name.

The HTTP backend speaks two GETs an operator puts in front of their search engine:
``{base}/search?q=QUERY&n=N`` answers ``{"results": [{"url", "title", "snippet"}]}`` and
``{base}/document?url=URL`` answers ``{"url", "title", "text"}`` (404 for an unknown URL).
"""

from __future__ import annotations

import html.parser
import os
import re
import sqlite3
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tqdm import tqdm

from gptoss_vllm.tools import ToolsError

SUFFIXES = (".md", ".markdown", ".txt", ".html", ".htm")
SHIPPED_COLLECTION = Path(__file__).with_name(
    "collection"
)  # the small collection the embedded default searches
_SCHEMA = "CREATE VIRTUAL TABLE docs USING fts5(url UNINDEXED, title, body, tokenize='porter unicode61')"


class SearchIndexError(ToolsError, RuntimeError):
    """An index that cannot be built or read; the message names the path."""


@dataclass(frozen=True)
class Hit:
    url: str
    title: str
    snippet: str


@dataclass(frozen=True)
class Document:
    url: str
    title: str
    text: str


class SearchBackend(Protocol):
    """What the browser needs of a search engine."""

    def search(self, query: str, n: int) -> list[Hit]: ...

    def document(self, url: str) -> Document | None: ...


class _Text(html.parser.HTMLParser):
    """An HTML page's title and visible text, a line per block."""

    BLOCKS = frozenset(
        {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "section", "article"}
    )

    def __init__(self) -> None:
        super().__init__()
        self.title = ""
        self.parts: list[str] = []
        self._skip = 0
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: object) -> None:
        if tag in ("script", "style"):
            self._skip += 1
        elif tag == "title":
            self._in_title = True
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self._skip = max(0, self._skip - 1)
        elif tag == "title":
            self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        elif not self._skip:
            self.parts.append(data)


def read_document(path: Path, root: Path) -> Document:
    """One file as a document: its URL under ``root``, title and text."""
    raw = path.read_text(encoding="utf-8", errors="replace")
    url = "doc:" + path.relative_to(root).as_posix()
    if path.suffix.lower() in (".html", ".htm"):
        parser = _Text()
        parser.feed(raw)
        text = re.sub(r"\n\s*\n+", "\n\n", "".join(parser.parts)).strip()
        return Document(url, parser.title.strip() or path.stem, text)
    heading = re.search(r"^#{1,6}\s+(.+)$", raw, re.MULTILINE)
    return Document(url, heading.group(1).strip() if heading else path.stem, raw.strip())


def _documents(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)


def build_index(docs: Path, out: Path, progress: bool = True) -> int:
    """Index every document under ``docs`` into ``out`` (replaced atomically); returns how many."""
    if not docs.is_dir():
        raise SearchIndexError(f"{docs}: not a directory of documents")
    paths = _documents(docs)
    if not paths:
        raise SearchIndexError(f"{docs}: no {', '.join(SUFFIXES)} files under it")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".building", dir=out.parent)
    os.close(fd)
    try:
        with sqlite3.connect(tmp) as db:
            db.execute(_SCHEMA)
            for path in tqdm(paths, desc="indexing", unit="doc", disable=not progress):
                doc = read_document(path, docs)
                db.execute(
                    "INSERT INTO docs (url, title, body) VALUES (?, ?, ?)", (doc.url, doc.title, doc.text)
                )
            db.execute("INSERT INTO docs (docs) VALUES ('optimize')")
        db.close()
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(paths)


def _fts_query(query: str) -> str:
    """The query's words as FTS5 terms, any of them (quoted: FTS5's own syntax is not the model's to use)."""
    words = re.findall(r"\w+", query.lower())
    return " OR ".join(f'"{w}"' for w in words)


class LocalIndex:
    """A read-only view of an index :func:`build_index` wrote."""

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise SearchIndexError(
                f"{path}: no such index (build one with `gptoss-vllm tools index DOCS --out {path}`)"
            )
        try:
            self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
            self.count = self._db.execute("SELECT count(*) FROM docs").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise SearchIndexError(f"{path}: not a gptoss-vllm search index ({exc})") from None

    def search(self, query: str, n: int) -> list[Hit]:
        terms = _fts_query(query)
        if not terms:
            return []
        rows = self._db.execute(
            "SELECT url, title, snippet(docs, 2, '', '', ' … ', 24) FROM docs WHERE docs MATCH ? "
            "ORDER BY bm25(docs, 0.0, 5.0, 1.0) LIMIT ?",
            (terms, n),
        ).fetchall()
        return [Hit(url, title, " ".join(snippet.split())) for url, title, snippet in rows]

    def document(self, url: str) -> Document | None:
        row = self._db.execute("SELECT url, title, body FROM docs WHERE url = ?", (url,)).fetchone()
        return Document(*row) if row else None

    def urls(self) -> Iterator[str]:
        yield from (row[0] for row in self._db.execute("SELECT url FROM docs"))


class HttpSearch:
    """The operator's search service (the two GETs in this module's docstring)."""

    def __init__(self, base_url: str, timeout_s: float = 10.0) -> None:
        import httpx

        self._client = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout_s)

    def search(self, query: str, n: int) -> list[Hit]:
        answer = self._client.get("/search", params={"q": query, "n": n})
        answer.raise_for_status()
        return [
            Hit(r["url"], r.get("title", r["url"]), r.get("snippet", "")) for r in answer.json()["results"]
        ]

    def document(self, url: str) -> Document | None:
        answer = self._client.get("/document", params={"url": url})
        if answer.status_code == 404:
            return None
        answer.raise_for_status()
        body = answer.json()
        return Document(body.get("url", url), body.get("title", url), body["text"])
