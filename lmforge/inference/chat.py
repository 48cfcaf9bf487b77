"""``lmforge chat RUN``: talk to a model in the terminal, in-process (no server).

The model is the run's chat fine-tuned checkpoint when it has one, else its latest pretrained one (a
base model continues text rather than answers: the command says so). Each turn sends the whole
conversation laid out by the chat template, ``[BOS] + tokenizer.encode_chat(messages,
add_generation_prompt=True)``, and streams the reply until the model's ``<|end|>`` token. When the
conversation outgrows the model's context the oldest turns are dropped (the system prompt is kept).

Commands: /reset, /system [TEXT], /temp [X], /help, /quit. On a terminal the line editor has history
(saved in ~/.lmforge_chat_history); Ctrl-C stops a reply and keeps the session, Ctrl-D leaves. With
piped input, stdout carries only the replies (one per message, each ending with a newline) and
everything else goes to stderr, so scripts can use it.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from lmforge.errors import LmforgeError
from lmforge.inference.generate import SamplingParams
from lmforge.tokenizer.bpe import END

HISTORY_FILE_NAME = ".lmforge_chat_history"
HISTORY_LENGTH = 1000

# Streams the reply to a prompt (token ids, BOS included) as text pieces; closing it early stops generation.
Replier = Callable[[list[int], SamplingParams], Iterator[str]]

HELP = """commands:
  /reset         start a new conversation (the system prompt stays)
  /system TEXT   set the system prompt; /system alone shows it, /system - removes it
  /temp X        set the sampling temperature (0 is greedy); /temp alone shows it
  /help          this list
  /quit          leave (Ctrl-D too)
Ctrl-C stops a reply and keeps the conversation. A message that starts with / is sent as typed after //."""


class ContextOverflow(LmforgeError):
    """The newest message (with the system prompt) leaves no room for a reply even with every older turn dropped."""


class Conversation:
    """The system prompt and the messages of one chat, rendered to the prompt the model is given.

    ``prompt_ids`` drops the oldest turns (for good) until the prompt leaves ``reply_tokens`` of the
    context free, so a long chat keeps going with its most recent turns.
    """

    def __init__(self, tokenizer, context_length: int, system: str = ""):
        self.tokenizer, self.context_length = tokenizer, context_length
        self.system = system
        self.messages: list[dict[str, str]] = []

    def render(self) -> list[int]:
        """``[BOS] + encode_chat(...)`` of the whole conversation, opening the assistant's turn."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [self.tokenizer.bos_id, *self.tokenizer.encode_chat(system + self.messages, add_generation_prompt=True)]

    def prompt_ids(self, reply_tokens: int) -> tuple[list[int], int]:
        """(prompt ids, number of messages dropped to make them fit with ``reply_tokens`` to spare)."""
        limit = self.context_length - reply_tokens
        dropped = 0
        ids = self.render()
        while len(ids) > limit and len(self.messages) > 1:
            # Drop the oldest turn: a user message and the reply to it.
            count = 2 if len(self.messages) > 2 and self.messages[1]["role"] == "assistant" else 1
            del self.messages[:count]
            dropped += count
            ids = self.render()
        if len(ids) > limit:
            with_system = " with the system prompt" if self.system else ""
            raise ContextOverflow(f"the message is {len(ids)} tokens{with_system}; the model's context is {self.context_length} "
                                  f"tokens and {reply_tokens} are kept for the reply: shorten it" +
                                  (" or the system prompt (/system)" if self.system else ""))
        return ids, dropped


def reply_budget(params: SamplingParams, context_length: int) -> int:
    """Tokens kept free for the reply: max_new_tokens, but never more than half the context (the rest is the chat)."""
    return max(1, min(params.max_new_tokens, context_length // 2))


def engine_replier(engine, tokenizer) -> Replier:
    """A ``Replier`` on a started ``Engine``: streams text until ``<|end|>``, EOS or the token limit."""
    from lmforge.inference.engine import Finished

    end_id = tokenizer.token_id(END)

    def reply(prompt_ids: list[int], params: SamplingParams) -> Iterator[str]:
        # The assistant's turn ends with <|end|>: a stop token, so its text never reaches the reply.
        handle = engine.submit(prompt_ids, replace(params, stop_token_ids=[*params.stop_token_ids, end_id]))
        try:
            for event in handle.events():
                if isinstance(event, Finished):
                    if event.finish_reason == "error":
                        raise LmforgeError(f"generation failed: {event.error}")
                elif event.text:
                    yield event.text
        finally:
            if not handle.done:
                handle.cancel()  # Ctrl-C, or the caller stopped reading: free the engine's slot

    return reply


class ChatRepl:
    """The read-reply loop over text streams; ``run()`` returns the exit status (0).

    ``stdin`` that is the real terminal gets ``input()`` with readline editing and history; any other
    stream is read line by line. Replies go to ``stdout``; notes, command answers and errors to ``stderr``.
    """

    def __init__(self, replier: Replier, tokenizer, context_length: int, params: SamplingParams, system: str = "",
                 stdin: TextIO | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None):
        self.replier, self.params = replier, params
        self.conversation = Conversation(tokenizer, context_length, system)
        self.stdin, self.stdout, self.stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
        self.interactive = self.stdin is sys.stdin and self.stdin.isatty()
        self.turns = 0  # replies asked for, to vary a fixed seed from one turn to the next
        self.told_about_dropping = False

    def note(self, text: str) -> None:
        self.stderr.write(text + "\n")
        self.stderr.flush()

    def run(self) -> int:
        history = _start_history() if self.interactive else None
        if self.interactive:
            self.note("Type a message, or /help. Ctrl-D or /quit to leave.")
        try:
            while (line := self._read_line()) is not None:
                line = line.rstrip("\r\n")
                if line.startswith("/") and not line.startswith("//"):
                    if not self.command(line):
                        break
                elif line.strip():
                    self.respond(line[1:] if line.startswith("//") else line)
        finally:
            if history is not None:
                _save_history(history)
        return 0

    def _read_line(self) -> str | None:
        """The next line, or None at the end of input. Ctrl-C at the prompt gives an empty line."""
        try:
            if self.interactive:
                return input("you> ")
            return self.stdin.readline() or None
        except EOFError:
            self.stdout.write("\n")
            return None
        except KeyboardInterrupt:
            self.note("\n(Ctrl-D or /quit to leave)")
            return ""

    def command(self, line: str) -> bool:
        """Run a /command; False when the session should end."""
        name, _, argument = line.partition(" ")
        argument = argument.strip()
        if name in ("/quit", "/exit"):
            return False
        if name == "/help":
            self.note(HELP)
        elif name == "/reset":
            self.conversation.messages.clear()
            self.told_about_dropping = False
            self.note("new conversation" + (" (the system prompt stays; /system - removes it)" if self.conversation.system else ""))
        elif name == "/system":
            self._system(argument)
        elif name == "/temp":
            self._temperature(argument)
        else:
            self.note(f"unknown command {name}; /help lists them (start a message with // to send a leading /)")
        return True

    def _system(self, argument: str) -> None:
        if not argument:
            system = self.conversation.system
            self.note(f"system prompt: {system}" if system else "no system prompt (/system TEXT sets one)")
        elif argument == "-":
            self.conversation.system = ""
            self.note("system prompt removed")
        else:
            self.conversation.system = argument
            self.note("system prompt set")

    def _temperature(self, argument: str) -> None:
        if not argument:
            self.note(f"temperature: {self.params.temperature:g}")
            return
        try:
            value = float(argument)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value >= 0):
            self.note(f"/temp takes a number >= 0, e.g. /temp 0.7 (0 is greedy); got {argument!r}")
            return
        self.params = replace(self.params, temperature=value)
        self.note(f"temperature: {value:g}")

    def respond(self, text: str) -> None:
        """Add the user's message, stream the reply to stdout and add it to the conversation."""
        conversation = self.conversation
        conversation.messages.append({"role": "user", "content": text})
        budget = reply_budget(self.params, conversation.context_length)
        try:
            prompt_ids, dropped = conversation.prompt_ids(budget)
        except ContextOverflow as exc:
            conversation.messages.pop()
            self.note(f"error: {exc}")
            return
        if dropped and not self.told_about_dropping:
            self.told_about_dropping = True
            self.note(f"(the conversation is longer than the model's {conversation.context_length}-token context: "
                      "dropping the oldest turns from now on; the system prompt is kept)")
        seed = None if self.params.seed is None else self.params.seed + self.turns
        params = replace(self.params, max_new_tokens=min(self.params.max_new_tokens, conversation.context_length - len(prompt_ids)),
                         seed=seed)
        self.turns += 1
        pieces: list[str] = []
        stream = self.replier(prompt_ids, params)
        try:
            for piece in stream:
                pieces.append(piece)
                self.stdout.write(_sanitize(piece))
                self.stdout.flush()
        except KeyboardInterrupt:
            self.stdout.write("\n")
            self.note("(reply stopped)")
        except LmforgeError as exc:
            self.stdout.write("\n")
            self.note(f"error: {exc}")
        finally:
            stream.close()
        conversation.messages.append({"role": "assistant", "content": "".join(pieces)})
        self.stdout.write("\n\n" if self.interactive else "\n")
        self.stdout.flush()


def _sanitize(text: str) -> str:
    from lmforge.evaluation.judge import sanitize

    return sanitize(text)


def _start_history():
    """Load readline's history; returns its file, or None when there is no readline (history is a nicety)."""
    try:
        import readline
    except ImportError:
        return None
    path = Path.home() / HISTORY_FILE_NAME
    try:
        readline.read_history_file(path)
    except (OSError, RuntimeError):
        pass  # no history yet, or an unreadable one: start empty
    readline.set_history_length(HISTORY_LENGTH)
    return path


def _save_history(path: Path) -> None:
    import readline

    try:
        readline.write_history_file(path)
    except (OSError, RuntimeError):
        pass  # a read-only home must not spoil leaving the chat


# The command.

DESCRIPTION = """Chat with a model in the terminal, in this process (no server needed).

RUN is a run folder: its chat fine-tuned model (RUN/sft/checkpoints) when it has one, else its latest
checkpoint (a base model, which continues text rather than answers: you are warned). A checkpoint
folder is used as given. The conversation is sent with the chat template each turn; when it outgrows
the model's context the oldest turns are dropped and the system prompt kept.

""" + HELP

EXAMPLES = """examples:
  lmforge chat runs/default
  lmforge chat runs/default --system "You answer in one sentence." --temperature 0.3
  printf 'What does json.dumps do?\\n' | lmforge chat runs/default --seed 0 > reply.txt"""


def add_chat_parser(subparsers) -> argparse.ArgumentParser:
    """Declare ``lmforge chat`` on the CLI's subparsers; ``run_chat`` runs it."""
    parser = subparsers.add_parser("chat", help="chat with a model in the terminal: streaming, history, /reset, /system, /temp",
                                   description=DESCRIPTION, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path,
                        help="run folder (its fine-tuned chat model if any, else its latest checkpoint) or checkpoint folder")
    parser.add_argument("--system", default="", metavar="TEXT", help="system prompt (default: none; /system changes it)")
    parser.add_argument("--temperature", type=float, default=0.7, metavar="T", help="sampling temperature, 0 is greedy (default 0.7)")
    parser.add_argument("--top-p", type=float, default=0.95, metavar="P", help="nucleus sampling: keep the most likely tokens "
                        "covering P of the probability (default 0.95)")
    parser.add_argument("--max-new-tokens", type=int, default=256, metavar="N",
                        help="longest reply in tokens (default 256; never more than the context allows)")
    parser.add_argument("--seed", type=int, default=None, metavar="S", help="seed for reproducible replies (turn i uses S+i)")
    parser.add_argument("--device", default="auto", metavar="DEVICE", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--compile", action="store_true",
                        help="compile the decode step with torch.compile at start (a few seconds; needs a C++ compiler on CPU)")
    return parser


def run_chat(args: argparse.Namespace) -> int:
    """Run ``lmforge chat`` from parsed arguments: load the model, then the read-reply loop on stdin."""
    from lmforge.evaluation.report import load_for_inference
    from lmforge.inference.engine import Engine
    from lmforge.training.checkpoint import FINETUNED_DIR, is_finetuned_checkpoint

    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    params.validate()
    model, tokenizer, checkpoint = load_for_inference(args.run, args.device, prefer_finetuned=True)
    if is_finetuned_checkpoint(checkpoint):
        print(f"chat: {checkpoint} (fine-tuned for chat)", file=sys.stderr)
    else:
        print(f"chat: {checkpoint}\nwarning: this is a base model, not fine-tuned for chat: expect it to continue the text "
              f"rather than answer (fine-tune it first: RUN/{FINETUNED_DIR}/checkpoints is used when present)", file=sys.stderr)
    engine = Engine(model, tokenizer, max_batch_size=1, compile=args.compile)
    engine.start()
    try:
        repl = ChatRepl(engine_replier(engine, tokenizer), tokenizer, model.config.context_length, params, system=args.system)
        return repl.run()
    finally:
        engine.stop(drain=False)
