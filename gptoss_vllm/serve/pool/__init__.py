"""The pool replica: one ``AsyncLLM`` per replica behind vLLM's own OpenAI serving layer, its answers observed
as they pass and sent to the ingress over the answer channel."""
