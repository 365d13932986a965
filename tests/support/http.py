"""One HTTP client for the tests' many short calls to the stacks.

``httpx.get`` and friends build a client, and with it a TLS context that loads the CA bundle (about 20 ms of
CPU), on every call. With the engines holding both cores, that burst waited up to 15 s for the CPU here, so a
poll of a few metrics endpoints took half a minute; through one client a call costs a millisecond. Connections
are not kept alive: the stacks restart replicas under the tests, and a fresh connection never meets a closed
one."""

from __future__ import annotations

import httpx

_CLIENT = httpx.Client(limits=httpx.Limits(max_keepalive_connections=0))

get = _CLIENT.get
post = _CLIENT.post
stream = _CLIENT.stream
request = _CLIENT.request
