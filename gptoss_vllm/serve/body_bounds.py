"""The messages a client gets for a request body over its bound or too slow to arrive: the proxy gate (in Ray's
proxy) and the ingress (for paths that bypass the gate) answer them alike."""


def too_large(limit: int) -> str:
    return f"Request body is over the limit of {limit} bytes"


def too_slow(timeout_s: float) -> str:
    return f"The request body did not arrive within {timeout_s:g} s; send it whole"
