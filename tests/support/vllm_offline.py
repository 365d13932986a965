"""Run one offline vLLM engine over token-id prompts; read a JSON job on stdin, print a JSON result line.

Job: {"model": DIR, "engine": {LLM kwargs}, "prompts": [[ids]],
      "phases": [{"name": str, "sampling": {SamplingParams kwargs}, "one_at_a_time": bool}]}.
Result (stdout line prefixed RESULT): {phase name: [{"token_ids": [...], "prompt_logprobs": [...]}]}.
Run in a subprocess because vLLM's engine forks/spawns workers and needs a __main__ guard.
"""

from __future__ import annotations

import json
import os
import sys


def _summary(out) -> dict:
    prompt_lp = None
    if out.prompt_logprobs is not None:
        # Position 0 has no logprob; later positions map token id -> Logprob for the actual token.
        prompt_lp = [
            None if lp is None else lp[tok].logprob
            for tok, lp in zip(out.prompt_token_ids, out.prompt_logprobs, strict=True)
        ]
    return {"token_ids": list(out.outputs[0].token_ids), "prompt_logprobs": prompt_lp}


def main() -> None:
    job = json.load(sys.stdin)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    engine = {"max_model_len": 1024, "enforce_eager": True, "seed": 0, **job.get("engine", {})}
    llm = LLM(model=job["model"], **engine)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]
    result = {}
    for phase in job["phases"]:
        params = SamplingParams(**{"temperature": 0.0, **phase.get("sampling", {})})
        if phase.get("one_at_a_time"):
            outs = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]
        else:
            outs = llm.generate(prompts, params, use_tqdm=False)
        result[phase["name"]] = [_summary(o) for o in outs]
    print("RESULT " + json.dumps(result), flush=True)
    llm.llm_engine.engine_core.shutdown(timeout=30)


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Interpreter teardown after vLLM sometimes aborts ("terminate called without an active exception",
    # SIGABRT) or hangs in a C++ thread destructor; the engine is already shut down, so skip it.
    os._exit(0)
