"""Run one offline vLLM engine over token-id prompts; read a JSON job on stdin, print a JSON result line.

Job: {"model": DIR, "engine": {LLM kwargs}, "prompts": [[ids]], "sampling": {SamplingParams kwargs}}.
Result (last stdout line, prefixed RESULT): {"outputs": [{"token_ids": [...], "prompt_logprobs": [...]}]}.
Run in a subprocess because vLLM's engine forks/spawns workers and needs a __main__ guard.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    job = json.load(sys.stdin)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    engine = {"max_model_len": 1024, "enforce_eager": True, "seed": 0, **job.get("engine", {})}
    llm = LLM(model=job["model"], **engine)
    params = SamplingParams(**{"temperature": 0.0, **job.get("sampling", {})})
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in job["prompts"]], params, use_tqdm=False)
    result = []
    for out in outs:
        prompt_lp = None
        if out.prompt_logprobs is not None:
            # Position 0 has no logprob; later positions map token id -> Logprob for the actual token.
            prompt_lp = [
                None if lp is None else lp[tok].logprob
                for tok, lp in zip(out.prompt_token_ids, out.prompt_logprobs, strict=True)
            ]
        result.append({"token_ids": list(out.outputs[0].token_ids), "prompt_logprobs": prompt_lp})
    print("RESULT " + json.dumps({"outputs": result}), flush=True)


if __name__ == "__main__":
    main()
