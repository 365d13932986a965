"""Nano's data, rendering, training step, scoring and asset expansion, without serving."""

from __future__ import annotations

import dataclasses
import random
import statistics
import subprocess
import sys

import pytest
import torch

from gptoss_vllm.nano.conversations import (
    chat_messages,
    completion_ids,
    examples_for,
    prompt_ids,
    sample_examples,
    vocabulary,
)
from gptoss_vllm.nano.evaluate import Turn, parse_harmony, score
from gptoss_vllm.nano.tasks import EFFORTS, FAMILIES, LOOKUP_TOOL, analysis, make_task


@pytest.fixture(scope="module")
def vocab() -> list[int]:
    return vocabulary()


def _decode(ids: list[int]) -> str:
    from gptoss_vllm.nano.conversations import _encoding

    return _encoding().decode(ids)


def test_task_answers_are_right():
    rng = random.Random(3)
    for _ in range(200):
        add, srt = make_task(rng, "add"), make_task(rng, "sort")
        assert int(add.answer) == sum(add.numbers)
        assert srt.answer == "[" + ", ".join(map(str, sorted(srt.numbers))) + "]"
        assert len(set(srt.numbers)) == len(srt.numbers)
    assert make_task(random.Random(5), "lookup") == make_task(random.Random(5), "lookup")


def test_high_effort_analysis_works_the_carries_and_computed_digits_are_one_token_each():
    from gptoss_vllm.nano.conversations import encode_text
    from gptoss_vllm.nano.tasks import SPELL, Task, spelled

    task = Task("add", "What is 67 + 8?", spelled(75), (67, 8))
    text = analysis(task, "high")
    plain = text.replace(SPELL, "")
    assert plain.startswith("The numbers are 67 and 8.")  # restated in the prompt's order
    assert "Ones: 7 + 8 = 15, write 5, carry 1. Tens: 6 + 1 = 7." in plain
    assert plain.endswith("The answer is 75.") and task.answer == "75"
    tokens = [_decode([t]) for t in encode_text(text)]
    assert "67" in tokens  # read from the prompt: the tokenizer's own token
    assert "15" not in tokens and "75" not in tokens and tokens.count("7") == 3  # computed: digit by digit
    no_carry = analysis(Task("add", "What is 41 + 3?", spelled(44), (41, 3)), "high").replace(SPELL, "")
    assert "Ones: 1 + 3 = 4, write 4, carry 0. Tens: 4 + 0 = 4. The answer is 44." in no_carry


def test_prompts_match_vllms_chat_rendering(monkeypatch):
    """The training prompt is what vLLM's chat serving renders for the same request (its own helpers)."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionToolsParam
    from vllm.entrypoints.openai.parser.harmony_utils import (
        build_harmony_preamble,
        parse_chat_inputs_to_harmony_messages,
        render_for_completion,
    )

    monkeypatch.setenv("VLLM_SYSTEM_START_DATE", "2031-02-03")
    rng = random.Random(1)
    for family in FAMILIES:
        task = make_task(rng, family)
        for effort in EFFORTS:
            for after_tool in (False, True) if family == "lookup" else (False,):
                messages = chat_messages(task, after_tool)
                tools = [ChatCompletionToolsParam.model_validate(LOOKUP_TOOL)] if family == "lookup" else None
                preamble = build_harmony_preamble(
                    tools=tools, reasoning_effort=effort, with_custom_tools=bool(tools)
                )
                expected = render_for_completion(preamble + parse_chat_inputs_to_harmony_messages(messages))
                assert prompt_ids(messages, effort, family == "lookup", "2031-02-03") == expected


def test_responses_follow_ups_are_what_vllm_renders_from_the_stored_turn(monkeypatch):
    """A lookup follow-up through the Responses store: the first turn the model writes, parsed into the output
    items the store keeps (its reasoning among them), then the tool's result, rendered by vLLM's Responses
    helpers, is the training prompt; and it holds the first analysis, which a chat follow-up does not."""
    from openai.types.responses import FunctionTool
    from vllm.entrypoints.openai.parser.harmony_utils import (
        build_harmony_preamble,
        get_streamable_parser_for_assistant,
        render_for_completion,
    )
    from vllm.entrypoints.openai.responses.harmony import (
        harmony_to_response_output,
        response_input_to_harmony,
    )

    from gptoss_vllm.nano.conversations import TOOL_CALL_ID, responses_follow_up_ids

    monkeypatch.setenv("VLLM_SYSTEM_START_DATE", "2031-02-03")
    tool = FunctionTool.model_validate({"type": "function", **LOOKUP_TOOL["function"], "strict": None})
    rng = random.Random(4)
    for effort in EFFORTS:
        task = make_task(rng, "lookup")
        parser = get_streamable_parser_for_assistant()
        for token in completion_ids(task, effort, after_tool=False):
            parser.process(token)
        stored = [item for m in parser.messages for item in harmony_to_response_output(m, frozenset())]
        assert [item.type for item in stored] == ["reasoning", "function_call"]
        stored[1] = stored[1].model_copy(update={"call_id": TOOL_CALL_ID})
        items = [
            {"type": "message", "role": "user", "content": task.user},
            *(item.model_dump() for item in stored),
            {"type": "function_call_output", "call_id": TOOL_CALL_ID, "output": task.tool_result},
        ]
        messages = build_harmony_preamble(tools=[tool], reasoning_effort=effort, with_custom_tools=True)
        messages += [response_input_to_harmony(item, [stored[1]]) for item in items]
        follow_up = responses_follow_up_ids(task, effort, "2031-02-03")
        assert follow_up == render_for_completion(messages)
        first_analysis = analysis(task, effort, after_tool=False)
        assert first_analysis in _decode(follow_up)
        assert first_analysis not in _decode(
            prompt_ids(chat_messages(task, True), effort, True, "2031-02-03")
        )


def test_completions_parse_back_and_reasoning_grows_with_effort():
    rng = random.Random(2)
    lengths = {effort: [] for effort in EFFORTS}
    for _ in range(40):
        for family in FAMILIES:
            task = make_task(rng, family)
            for effort in EFFORTS:
                turn = parse_harmony(_decode(completion_ids(task, effort, False)))
                assert turn.parsed
                if family == "lookup":
                    assert turn.tool_key == task.key
                    final = parse_harmony(_decode(completion_ids(task, effort, True)))
                    assert final.answer == task.answer
                else:
                    assert turn.answer == task.answer
                lengths[effort].append(turn.reasoning_tokens)
    means = [statistics.mean(lengths[e]) for e in EFFORTS]
    assert means[1] >= 1.5 * means[0] and means[2] >= 1.5 * means[1], means
    assert not parse_harmony("<|channel|>final<|message|>42<|return|>").parsed
    assert not parse_harmony(
        "<|channel|>analysis<|message|>x<|end|><|start|>assistant<|channel|>final<|message|>4"
    ).parsed


def test_score_counts_lookups_over_two_turns():
    rng = random.Random(4)
    tasks = [make_task(rng, "lookup"), make_task(rng, "add")]

    def oracle(requests):
        turns = []
        for task, effort, after in requests:
            turn = parse_harmony(_decode(completion_ids(task, effort, after)))
            turns.append(
                turn if task.family == "lookup" or effort != "low" else Turn(True, 1, answer="wrong")
            )
        return turns

    low, high = score(tasks, ("low", "high"), oracle)
    assert (low.accuracy, high.accuracy) == (0.5, 1.0)
    assert low.parsed == high.parsed == 1.0


def test_vocabulary_covers_the_data(vocab):
    rng = random.Random(9)
    known = set(vocab)
    for _ in range(200):
        for example in sample_examples(rng):
            assert known.issuperset(example.tokens)
    # Templates, every number token (three digits at most), dates, the tools' declarations and pages: a sliver
    # of the 201088.
    assert 1500 < len(vocab) < 2500
    drawn = [sample_examples(rng)[0] for _ in range(1000)]
    # Sums take 2 of 6 parts, the browser 0.8, and half are at high effort (1000 draws: the bounds are about 4
    # sigma).
    assert 275 < sum(e.family == "add" for e in drawn) < 395
    assert 90 < sum(e.family == "browser" for e in drawn) < 180
    assert 440 < sum(e.effort == "high" for e in drawn) < 560


def test_training_forward_is_hfs_forward(vocab):
    """The plain-torch training forward gives HF's logits on right-padded batches longer than the window."""
    from transformers import GptOssForCausalLM

    from gptoss_vllm.nano.forward import forward_logits
    from gptoss_vllm.nano.train import batch_tensors, nano_hf_config

    torch.manual_seed(0)
    model = GptOssForCausalLM(nano_hf_config(len(vocab))).eval()
    with torch.no_grad():  # weights of a trained model's scale: routing, sinks and biases all matter
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    rng = random.Random(6)
    examples = [examples_for(make_task(rng, family), "high", True, "2026-11-29")[0] for family in FAMILIES]
    to_sub = {token: i for i, token in enumerate(vocab)}
    ids, _ = batch_tensors(examples, to_sub, 0)
    lengths = torch.tensor([len(e.tokens) for e in examples])
    mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
    assert model.config.sliding_window < lengths.min() < lengths.max()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        actual = forward_logits(model, ids)
        some = mask.bool() & (torch.rand(mask.shape, generator=torch.Generator().manual_seed(0)) < 0.3)
        selected = forward_logits(model, ids, some)  # only the positions training reads, in order
    real = mask.bool()
    torch.testing.assert_close(actual[real], expected[real], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(selected, expected[some], atol=1e-4, rtol=1e-4)


def test_training_is_deterministic_and_learns(vocab):
    from gptoss_vllm.nano.train import TrainSettings, train

    settings = TrainSettings(seed=11, steps=6, batch_size=4, warmup=1, qat_fraction=0.5, threads=1)
    first, second = train(settings, progress=False), train(settings, progress=False)
    assert first.losses == second.losses
    assert first.losses[-1] < first.losses[0]
    # Micro-batches only change the padding: one micro-batch per step trains the same model.
    whole = train(dataclasses.replace(settings, micro_batches=1), progress=False)
    assert whole.losses == pytest.approx(first.losses, rel=1e-4)


def test_a_stopped_training_resumes_from_its_checkpoint_to_the_same_model(tmp_path):
    from gptoss_vllm.nano.train import CHECKPOINT_FILE, TrainSettings, TrainStateError, train

    settings = TrainSettings(seed=11, steps=6, batch_size=4, warmup=1, qat_fraction=0.5, threads=1)
    whole = train(settings, progress=False)
    first = train(settings, progress=False, checkpoint_dir=tmp_path, checkpoint_every=2, until=3)
    assert not first.finished and len(first.losses) == 3 and (tmp_path / CHECKPOINT_FILE).exists()
    # The run goes on from step 3 (saved when it stopped), through the QAT switch at step 3, to the same model.
    resumed = train(settings, progress=False, checkpoint_dir=tmp_path, checkpoint_every=2)
    assert resumed.resumed_at == 3 and resumed.finished
    assert resumed.losses == whole.losses
    for (name, a), (_, b) in zip(
        whole.model.state_dict().items(), resumed.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    # Other settings than the checkpoint's are refused, naming what differs; on the command line, exit 2.
    with pytest.raises(TrainStateError, match=r"batch_size 4 there, 8 now"):
        train(dataclasses.replace(settings, batch_size=8), progress=False, checkpoint_dir=tmp_path)
    refused = subprocess.run(
        [sys.executable, "-m", "gptoss_vllm.cli", "train-nano", "--out", str(tmp_path / "nano.safetensors"),
         "--seed", "11", "--steps", "6", "--batch-size", "8", "--checkpoint-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert (
        refused.returncode == 2
        and "--checkpoint-dir:" in refused.stderr
        and "batch_size 4 there" in (refused.stderr)
    )
    assert not (tmp_path / "nano.safetensors").exists()


def test_expanded_checkpoint_is_the_trained_model_and_unseen_tokens_score_zero(vocab, tmp_path):
    from transformers import GptOssForCausalLM

    from gptoss_vllm.checkpoints.builder import write_checkpoint
    from gptoss_vllm.nano.asset import expanded_tensors, nano_config
    from gptoss_vllm.nano.train import TrainSettings, asset_tensors, train

    result = train(TrainSettings(seed=5, steps=2, batch_size=2, warmup=1, threads=1), progress=False)
    config = nano_config()
    path = write_checkpoint(
        tmp_path / "nano-bf16",
        config,
        dtype="bf16",
        progress=False,
        tensors=expanded_tensors(config, "bf16", asset_tensors(result.model, result.vocab, quantise=False)),
    )
    full = GptOssForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    example = examples_for(make_task(random.Random(0), "add"), "high", False, "2026-11-29")[0]
    to_sub = {t: i for i, t in enumerate(result.vocab)}
    with torch.no_grad():
        big = full(torch.tensor([example.tokens])).logits[0]
        small = result.model.float()(torch.tensor([[to_sub[t] for t in example.tokens]])).logits[0]
    ids = torch.tensor(result.vocab)
    torch.testing.assert_close(big[:, ids], small, atol=0.05, rtol=0.05)  # bf16 storage of the weights
    unseen = torch.ones(big.shape[1], dtype=torch.bool)
    unseen[ids] = False
    assert torch.count_nonzero(big[:, unseen]) == 0


def test_number_tokens_start_from_their_digits(vocab):
    """Number tokens that share a digit in the same place start alike (``47``, ``57``), others do not; with
    digit features, neighbouring digits also start closer than distant ones."""
    from transformers import GptOssForCausalLM

    from gptoss_vllm.nano.train import nano_hf_config, place_value_embeddings

    rows = {_decode([t]): i for i, t in enumerate(vocab)}
    similarity = {}
    for features in (False, True):
        torch.manual_seed(0)
        model = GptOssForCausalLM(nano_hf_config(len(vocab)))
        set_rows = place_value_embeddings(model, vocab, seed=0, digit_features=features)
        assert set_rows == sum(_decode([t]).isdigit() for t in vocab)
        emb = torch.nn.functional.normalize(model.model.embed_tokens.weight.detach(), dim=-1)
        assert emb[rows["47"]] @ emb[rows["57"]] > 0.3  # the same ones digit
        assert abs(emb[rows["47"]] @ emb[rows["12"]]) < 0.3
        digits = emb[[rows[str(d)] for d in range(10)]]
        cos = digits @ digits.T
        similarity[features] = (
            sum(cos[d, (d + 1) % 10] for d in range(10)) - sum(cos[d, (d + 5) % 10] for d in range(10))
        ) / 10
    assert similarity[True] > similarity[False] + 0.2


# The built-in tool families


def test_builtin_tasks_hold_their_answers():
    from gptoss_vllm.nano.tasks import ABUSE_CODES, BUILTIN_FAMILIES, printed

    rng = random.Random(12)
    for _ in range(100):
        python, run, browser = (make_task(rng, family) for family in BUILTIN_FAMILIES)
        a, b = python.numbers
        assert min(a, b) >= 10 and max(a, b) <= 99 and printed(python.code) == python.answer == str(a + b)
        assert run.code in run.user and (run.code in ABUSE_CODES) == (printed(run.code) is None)
        # The fact is stated once, on a line of its own, in one page of a collection of every shipped page.
        holding = [name for name, text in browser.documents if browser.fact.line in text.splitlines()]
        assert len(holding) == 1 and browser.fact.animal in browser.user
        assert sum(text.count(browser.fact.animal) for _, text in browser.documents) == 1
    assert printed("print(12 ** 2)") == "144" and printed("import os") is None


def test_declarations_are_what_vllm_reads_from_the_tool_servers(tmp_path):
    """The namespaces training declares are the ones vLLM's MCPToolServer reads from ``gptoss-vllm tools
    python|browser`` as a pool runs them (their defaults)."""
    import asyncio

    from vllm.entrypoints.mcp.tool_server import MCPToolServer

    from gptoss_vllm.bench.process import start_tool_server
    from gptoss_vllm.nano.builtin_tools import declarations
    from gptoss_vllm.tools.search_index import SHIPPED_COLLECTION, build_index

    index = tmp_path / "index.db"
    build_index(SHIPPED_COLLECTION, index, progress=False)
    servers = [
        start_tool_server("python", tmp_path / "python.log"),
        start_tool_server("browser", tmp_path / "browser.log", ["--index", str(index)]),
    ]
    try:
        reader = MCPToolServer()
        asyncio.run(reader.add_tool_server(",".join(s.address for s in servers)))
        for name in ("python", "browser"):
            assert reader.get_tool_description(name) == declarations()[name], name
    finally:
        for server in servers:
            server.stop()


@pytest.mark.parametrize("family", ["python", "run", "browser"])
def test_tool_conversations_are_vllms_responses_rendering(family, monkeypatch):
    """Each turn of a tool conversation is what vLLM's Responses loop renders: the first prompt is its preamble
    for the request, every later prompt its rendering of the history (``Transcript`` checks that the model's
    tokens stay a prefix), and the model's calls come out as the Responses items a client reads."""
    from vllm.entrypoints.openai.parser.harmony_utils import (
        build_harmony_preamble,
        get_user_message,
        render_for_completion,
    )
    from vllm.entrypoints.openai.responses.harmony import harmony_to_response_output

    from gptoss_vllm.nano.builtin_tools import Toolbox, declarations, script
    from gptoss_vllm.nano.tasks import own_tool

    monkeypatch.setenv("VLLM_SYSTEM_START_DATE", "2031-02-03")
    rng = random.Random(13)
    toolbox = Toolbox()
    for effort in EFFORTS:
        task = make_task(rng, family)
        for tools in (("python",), ("browser",), ("browser", "python")):
            if own_tool(family) not in tools:
                continue
            done = script(task, effort, tools, "2031-02-03", toolbox)
            t = done.transcript
            declared = {f"{name}_description": declarations()[name] for name in tools}
            preamble = build_harmony_preamble(reasoning_effort=effort, **declared)
            first = render_for_completion([*preamble, get_user_message(task.user)])
            assert t.tokens[: t.spans[0][0]] == first
            assert t.tokens[-1] == _token("<|return|>") and len(t.spans) == (3 if family == "browser" else 2)
            assert _decode(t.tokens[t.spans[-1][0] : t.spans[-1][1]]).endswith(done.answer + "<|return|>")
            written = [m for m in t.messages[2:] if m.author.role == "assistant"]
            items = [item for m in written for item in harmony_to_response_output(m, frozenset())]
            kinds = [item.type for item in items]
            if family == "browser":
                assert kinds.count("web_search_call") == 2 and kinds[-1] == "message"
                assert task.fact.when in done.answer and "doc:" in done.answer
            else:
                # vLLM answers a python call as reasoning (streaming adds code_interpreter_call events).
                reasoned = [c.text for item in items if item.type == "reasoning" for c in item.content]
                assert task.code in reasoned and kinds[-1] == "message"
        toolbox.forget(task)


def test_an_abuse_code_runs_in_the_sandbox_and_the_answer_says_it_failed():
    from gptoss_vllm.nano.builtin_tools import Toolbox, script
    from gptoss_vllm.nano.tasks import RUN_ERROR_ANSWER, Task

    code = "x = bytearray(10 ** 12)"
    task = Task("run", f"Run this with python: {code}", "", code=code)
    done = script(task, "high", ("python",), "2031-02-03", Toolbox())
    assert done.answer == RUN_ERROR_ANSWER
    assert "[the code ran out of memory" in _decode(done.transcript.tokens)


def test_score_counts_tool_conversations_by_family():
    from gptoss_vllm.nano.evaluate import Conversed, held_out_tasks

    tasks = held_out_tasks(2, families=("add", "python", "browser"))

    def oracle(requests):
        return [Turn(True, 3, answer=t.answer) for t, _, _ in requests]

    def converse(requests):
        out = []
        for task, effort in requests:
            if task.family == "python":
                expected = task.answer
                answer = expected if effort == "high" else "1234"
            else:
                expected = f"It changes {task.fact.when} 【1†L2】 (Title, doc:ops.md)."
                answer = expected if effort == "high" else expected.replace("doc:ops.md", "doc:other.md")
            out.append(Conversed(Turn(True, 5, answer=answer), expected))
        return out

    low, high = score(tasks, ("low", "high"), oracle, converse)
    assert high.accuracy == 1.0 and high.families == {"add": 1.0, "python": 1.0, "browser": 1.0}
    assert low.accuracy == pytest.approx(2 / 6) and low.families["browser"] == 0.0  # the source is wrong
    with pytest.raises(ValueError, match="converser"):
        score(tasks, ("low",), oracle)


def _token(text: str) -> int:
    from gptoss_vllm.nano.conversations import _encoding

    return _encoding().encode(text, allowed_special="all")[0]
