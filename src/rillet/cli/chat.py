"""`rillet chat`: an interactive terminal chat, against a server (--url) or in-process (--model).
The backends it talks through live in `rillet.cli.backends` (shared with `rillet generate`).

Inside the chat: /reset forgets the conversation, /system TEXT sets the system
prompt (/system alone clears it), /exit or Ctrl-D quits, Ctrl-C stops the answer
being generated (and aborts it on the server) without leaving the chat.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from rillet.cli.backends import (
    Backend,
    RemoteBackend,
    add_backend_arguments,
    make_backend,
    sampling_params,
    stream_answer,
)
from rillet.client import RilletError

__all__ = ["ChatSession", "add_parser", "run"]

HELP = """commands:
  /reset          forget the conversation (keeps the system prompt)
  /system TEXT    set the system prompt (and start over); /system alone clears it
  /help           this text
  /exit, Ctrl-D   quit
Ctrl-C stops the current answer without leaving the chat."""


# ----------------------------------------------------------------------------- chat


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "chat", help="interactive chat in the terminal", conflict_handler="resolve",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Chat with a model: against a server with --url (--model then names the served model),\n"
                    "else in-process (--model, default the embedded SmolLM2-135M-Instruct).\n\n" + HELP)
    add_backend_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def _dim(text: str, stream: Any) -> str:
    return f"\x1b[2m{text}\x1b[0m" if stream.isatty() and not os.environ.get("NO_COLOR") else text


class ChatSession:
    """The conversation and the commands; `turn()` handles one line of input."""

    def __init__(self, backend: Backend, params: dict[str, Any], system: str | None) -> None:
        self.backend = backend
        self.params = params
        self.system = system
        self.messages: list[dict] = []

    def conversation(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def command(self, text: str) -> bool | str:
        """Run a /command; False to quit, True when handled, or the text to send ("//x" sends "/x")."""
        command, _, rest = text.partition(" ")
        if command in ("/exit", "/quit", "/bye"):
            return False
        if command == "/reset":
            self.messages.clear()
            note("[conversation reset]")
        elif command == "/system":
            self.system = rest.strip() or None
            self.messages.clear()
            note("[system prompt set; conversation reset]" if self.system else "[system prompt cleared]")
        elif command in ("/help", "/?"):
            note(HELP)
        elif text.startswith("//"):
            return text[1:]
        else:
            note(f"unknown command {command}; /help lists them")
        return True

    def turn(self) -> bool:
        """Read one line and act on it; False when the user quits."""
        try:
            line = input(">>> ")
        except EOFError:
            note("")
            return False
        text = line.strip()
        if not text:
            return True
        if text.startswith("/"):
            outcome = self.command(text)
            if not isinstance(outcome, str):
                return outcome
            text = outcome
        self.messages.append({"role": "user", "content": text})
        try:
            answer = stream_answer(self.backend, self.conversation(), self.params, sys.stdout)
        except RilletError as exc:
            self.messages.pop()
            note(f"[error: {exc}]")
            return True
        sys.stdout.write("\n")
        sys.stdout.flush()
        if answer.interrupted and not answer.text:
            self.messages.pop()  # nothing came back: forget the question too
        else:
            self.messages.append({"role": "assistant", "content": answer.text})
        note(_dim(answer.stats(), sys.stderr))
        return True


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    try:
        backend = make_backend(args)
    except (RilletError, ValueError, OSError) as exc:
        print(f"rillet chat: error: {exc}", file=sys.stderr)
        return 1
    if isinstance(backend, RemoteBackend):
        try:
            backend.connect()
        except RilletError as exc:
            backend.close()
            print(f"rillet chat: error: {args.url}: {exc}", file=sys.stderr)
            return 1
    session = ChatSession(backend, sampling_params(args), args.system)
    note(_dim(f"rillet chat ({args.url or 'in-process'}, model {backend.model or 'default'}) - "
              "/help for commands, Ctrl-D or /exit to quit", sys.stderr))
    try:
        while True:
            try:
                if not session.turn():
                    return 0
            except KeyboardInterrupt:  # at the prompt, or between steps of a turn: stay in the chat
                note("^C (use /exit or Ctrl-D to quit)")
    finally:
        backend.close()
