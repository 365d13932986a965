"""The ingress replica: every request passes the pipeline here, then goes to a pool's handle.

``deployment`` wires the services together and owns no policy; ``pipeline`` runs the checks in order, from a
request's bytes to a :class:`~gptoss_vllm.serve.ingress.pipeline.Decision` or a refusal; ``responses/`` keeps the
Responses API's stored conversations and background runs.
"""
