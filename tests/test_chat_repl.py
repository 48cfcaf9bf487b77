"""`lmforge chat`: the terminal chat on the tiny trained run, driven through piped input.

The in-process tests wrap the real engine's replier to record the prompt ids each turn sends, so they
check the conversation the model is actually given, not what the screen shows.
"""

import io
import subprocess
import sys

import pytest

from lmforge.evaluation.report import load_for_inference
from lmforge.inference.chat import ChatRepl, engine_replier
from lmforge.inference.engine import Engine
from lmforge.inference.generate import SamplingParams


@pytest.fixture(scope="module")
def chat_model(trained_run):
    """(engine, tokenizer, context length) of the tiny run's model, as `lmforge chat` loads it."""
    model, tokenizer, _ = load_for_inference(trained_run, "cpu", prefer_finetuned=True)
    engine = Engine(model, tokenizer, max_batch_size=1).start()
    yield engine, tokenizer, model.config.context_length
    engine.stop(drain=False)


def recording(replier, sent: list):
    """The replier, also noting each (prompt ids, params, reply text) it was asked for."""
    def reply(prompt_ids, params):
        record = {"prompt_ids": list(prompt_ids), "params": params, "reply": ""}
        sent.append(record)
        for piece in replier(prompt_ids, params):
            record["reply"] += piece
            yield piece
    return reply


def chat(chat_model, script: str, replier=None, **settings):
    """Run the REPL on ``script`` as piped input; (repl, what each turn sent, stdout, stderr)."""
    engine, tokenizer, context_length = chat_model
    sent = []
    stdout, stderr = io.StringIO(), io.StringIO()
    params = SamplingParams(**{"max_new_tokens": 8, "temperature": 0.0, **settings})
    repl = ChatRepl(recording(replier or engine_replier(engine, tokenizer), sent), tokenizer, context_length, params,
                    stdin=io.StringIO(script), stdout=stdout, stderr=stderr)
    assert repl.run() == 0
    return repl, sent, stdout.getvalue(), stderr.getvalue()


def expected_prompt(tokenizer, messages):
    return [tokenizer.bos_id, *tokenizer.encode_chat(messages, add_generation_prompt=True)]


def test_lmforge_chat_with_piped_input(trained_run):
    # Greedy; the same message before and after /reset must get the same reply, since /reset empties
    # the conversation. stdout carries only the replies; the rest goes to stderr.
    script = "/temp abc\n/temp 0\nThe json module\n/reset\nThe json module\n"
    result = subprocess.run([sys.executable, "-m", "lmforge.cli", "chat", str(trained_run), "--max-new-tokens", "12"],
                            input=script, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "warning: this is a base model" in result.stderr
    assert "/temp takes a number >= 0" in result.stderr and "temperature: 0" in result.stderr
    half = len(result.stdout) // 2
    first, second = result.stdout[:half], result.stdout[half:]
    assert first == second and first.endswith("\n") and first.strip(), result.stdout


def test_system_and_reset_change_the_prompt_sent(chat_model):
    _, tokenizer, _ = chat_model
    repl, sent, stdout, stderr = chat(chat_model, "Hi\n/system Be brief.\n/system\nHi again\n/reset\nHi\n/system -\nBye\n")
    assert "system prompt: Be brief." in stderr
    first_reply = sent[0]["reply"]
    assert [record["prompt_ids"] for record in sent] == [
        expected_prompt(tokenizer, [{"role": "user", "content": "Hi"}]),
        expected_prompt(tokenizer, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                    {"role": "assistant", "content": first_reply}, {"role": "user", "content": "Hi again"}]),
        # /reset empties the conversation and keeps the system prompt:
        expected_prompt(tokenizer, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]),
        expected_prompt(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": sent[2]["reply"]},
                                    {"role": "user", "content": "Bye"}]),
    ]
    # The replies on stdout are the ones kept in the conversation, and the first two "Hi"s got the same greedy reply.
    assert stdout == "".join(record["reply"] + "\n" for record in sent)
    assert sent[2]["reply"] == first_reply
    assert repl.conversation.messages[-1] == {"role": "assistant", "content": sent[3]["reply"]}


def test_temperature_command_validates(chat_model):
    repl, sent, _, stderr = chat(chat_model, "/temp abc\n/temp -1\n/temp nan\n/temp inf\n/temp\nHi\n/temp 1.5\nHi\n", temperature=0.7)
    assert stderr.count("/temp takes a number >= 0") == 4
    assert "temperature: 0.7" in stderr
    assert [record["params"].temperature for record in sent] == [0.7, 1.5]
    assert repl.params.temperature == 1.5


def test_context_overflow_drops_the_oldest_turns(chat_model):
    _, tokenizer, context_length = chat_model
    system = "Answer about Python."
    messages = [f"Question {number}: what does the json module do with floats?" for number in range(6)]
    script = "\n".join(messages) + "\n" + "too long " * context_length + "\nLast question\n"
    repl, sent, _, stderr = chat(chat_model, f"/system {system}\n{script}")

    assert stderr.count("dropping the oldest turns") == 1  # said once
    assert "error: the message is" in stderr and "shorten it" in stderr  # one message cannot fit at all: refused
    assert len(sent) == len(messages) + 1  # every other message got a reply
    system_ids = [tokenizer.bos_id, *tokenizer.encode_chat([{"role": "system", "content": system}])]
    for record in sent:
        ids, params = record["prompt_ids"], record["params"]
        assert len(ids) + params.max_new_tokens <= context_length
        assert ids[: len(system_ids)] == system_ids  # the system prompt is always kept
    last = sent[-1]["prompt_ids"]
    assert last[-len(tokenizer.encode("Last question")) - 3:] == tokenizer.encode_chat([{"role": "user", "content": "Last question"}],
                                                                                   add_generation_prompt=True)
    assert tokenizer.encode(messages[0]) not in [last[i:i + len(tokenizer.encode(messages[0]))] for i in range(len(last))]
    # What was dropped is gone from the conversation; the refused message never entered it.
    kept = [message["content"] for message in repl.conversation.messages if message["role"] == "user"]
    assert messages[0] not in kept and kept[-1] == "Last question" and not any("too long" in text for text in kept)


def test_ctrl_c_stops_the_reply_and_keeps_the_session(chat_model):
    engine, tokenizer, _ = chat_model
    calls = []

    def interrupted_first_reply(prompt_ids, params):
        # What Ctrl-C does during a reply: KeyboardInterrupt while the REPL reads the stream (first turn only).
        calls.append(prompt_ids)
        stream = engine_replier(engine, tokenizer)(prompt_ids, params)
        try:
            for number, piece in enumerate(stream):
                yield piece
                if len(calls) == 1 and number == 0:
                    raise KeyboardInterrupt
        finally:
            stream.close()

    cancelled_before = engine.stats()["requests_cancelled"]
    repl, sent, stdout, stderr = chat(chat_model, "Hi\nHi again\n/quit\nNever sent\n", replier=interrupted_first_reply,
                                      max_new_tokens=20)
    assert "(reply stopped)" in stderr
    assert engine.stats()["requests_cancelled"] == cancelled_before + 1  # the engine stopped generating it
    assert len(sent) == 2 and sent[0]["reply"] and len(sent[1]["reply"]) > len(sent[0]["reply"])
    # The partial reply stays in the conversation and the session went on; /quit ended it before "Never sent".
    assert repl.conversation.messages == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": sent[0]["reply"]},
                                          {"role": "user", "content": "Hi again"}, {"role": "assistant", "content": sent[1]["reply"]}]
