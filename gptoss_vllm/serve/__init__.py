"""Ray Serve application: an OpenAI-compatible gpt-oss service that routes each request by its reasoning effort.

The folders are the processes the code runs in; data flows one way, proxy -> ingress -> pool:

- ``proxy/``: in Ray Serve's HTTP proxy, on every Ray node: the gate that bounds headers, bodies and upload
  time, the rewriting of Ray's own error answers, and the proxy's metrics.
- ``ingress/``: in the ingress replicas: the deployment (HTTP routes wired to the services it is given), the
  request pipeline and its steps (keys, rate limits, quotas, effort, budget, admission), the peer-count
  exchange between ingress replicas, and ``responses/`` (the store, conversation expansion, background runs).
- ``pool/``: in the pool replicas: the deployment (an ``AsyncLLM`` behind vLLM's own OpenAI serving layer),
  its engine arguments, the engine's signals for autoscaling, the stream observer and the answer channel back
  to the ingress; and what Ray Serve runs for each pool elsewhere: the request routers (in the calling ingress
  process) and the autoscaling policy (in the Serve controller).
- here, in the driver (``gptoss-vllm serve``, or the RayService's import paths): ``config`` (the one YAML
  schema, and the view of it the ingress is deployed with), ``app`` (builds the Ray Serve applications: one per
  pool and the ingress's), ``launcher`` (starts Ray and Serve, waits until ready); and the leaves that proxy,
  ingress and pool share: ``app_names`` (the applications' names), ``openai_errors`` (OpenAI's error shape),
  ``body_bounds`` and ``asgi``.

Helpers that only the benches and tests use (starting a stack or a vLLM server as a process) live in
:mod:`gptoss_vllm.bench`.
"""


class ServeError(Exception):
    """Every error of ``gptoss_vllm.serve``: the service's configuration, launch or a request's settings cannot be used."""
