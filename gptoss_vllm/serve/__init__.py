"""Ray Serve application: an OpenAI-compatible gpt-oss service that routes each request by its reasoning effort.

``config`` (the one YAML schema) -> ``app`` (builds the Ray Serve application) -> ``ingress`` (HTTP, auth,
effort, budgets, admission) -> ``pool`` (one deployment per pool, each replica an ``AsyncLLM`` behind vLLM's own
OpenAI serving layer).
"""
