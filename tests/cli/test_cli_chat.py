"""`rillet chat` driven through a pseudo-terminal against the shared real server."""

from __future__ import annotations

import re

STATS = r"\[(\d+) tokens[^\]]*?context (\d+) tokens[^\]]*\]"


def test_chat_keeps_the_conversation_and_resets(server, spawn):
    chat = spawn("chat", "--url", server.url, "--api-key", server.api_key, "--max-tokens", "12",
                 "--temperature", "0")
    chat.expect(r">>> ")
    chat.send("What is the capital of France?\r")
    first = chat.expect(STATS)
    answer = chat.output[: first.start()].rsplit("France?\n", 1)[-1].strip()
    assert answer, chat.output
    chat.expect(r">>> ")

    chat.send("And of Italy?\r")
    second = chat.expect(STATS)
    assert int(second.group(2)) > int(first.group(2))  # the second turn carries the first
    chat.expect(r">>> ")

    chat.send("/reset\r")
    chat.expect(r"\[conversation reset\]")
    chat.expect(r">>> ")
    chat.send("What is the capital of France?\r")
    again = chat.expect(STATS)
    assert again.group(2) == first.group(2)  # the same single turn again (greedy)
    chat.expect(r">>> ")

    chat.send("/system You are a pirate.\r")
    chat.expect(r"\[system prompt set; conversation reset\]")
    chat.expect(r">>> ")
    chat.send("Hello\r")
    chat.expect(STATS)
    chat.expect(r">>> ")
    chat.send("/exit\r")
    assert chat.wait() == 0


def test_ctrl_c_stops_the_answer_and_keeps_the_chat(server, spawn):
    chat = spawn("chat", "--url", server.url, "--api-key", server.api_key, "--max-tokens", "1500",
                 "--ignore-eos")
    chat.expect(r">>> ")
    chat.wait_for_input_read()
    chat.send("\x03")  # at the prompt: stays
    chat.expect(r"use /exit or Ctrl-D to quit")
    chat.expect(r">>> ")

    before = server.abort_count()
    chat.send("Tell me a very long story about a dragon.\r")
    chat.expect(r"dragon\.\n")  # the echo of the question
    chat.expect(r"\w+\W+\w+")  # words of the answer, streamed while it is being generated
    chat.send("\x03")
    stats = chat.expect(r"\[(\d+) tokens[^\]]*stopped\]")
    assert int(stats.group(1)) < 1500
    chat.expect(r">>> ")
    server.wait_abort_count_above(before)  # closing the stream aborted the request on the server

    chat.send("/reset\r")  # still alive
    chat.expect(r"\[conversation reset\]")
    chat.expect(r">>> ")
    chat.send("\x04")  # Ctrl-D quits
    assert chat.wait() == 0
    assert not re.search(r"Traceback", chat.output)


def test_in_process_chat_streams_and_ctrl_c_stops(spawn):
    chat = spawn("chat", "--max-tokens", "1500", "--ignore-eos", "--temperature", "0")
    chat.expect(r"loading model|converting", timeout=60)  # the progress bar while the engine starts
    chat.expect(r"in-process, model SmolLM2", timeout=180)
    chat.expect(r">>> ")
    chat.send("Tell me a very long story about a dragon.\r")
    chat.expect(r"dragon\.\n")
    chat.expect(r"\w+\W+\w+")  # streamed words
    chat.send("\x03")
    stats = chat.expect(r"\[(\d+) tokens[^\]]*stopped\]")
    assert 1 <= int(stats.group(1)) < 1500
    chat.expect(r">>> ")
    chat.send("/exit\r")
    assert chat.wait(60) == 0  # the engine shuts down cleanly after an aborted request


def test_chat_refuses_to_start_without_a_reachable_server(server, run_cli):
    res = run_cli("chat", "--url", server.url, "--api-key", "wrong", input="hello\n")
    assert res.returncode == 1 and "401" in res.stderr and "Traceback" not in res.stderr
