"""`rillet generate` end to end in a subprocess: against the shared server and in-process."""

from __future__ import annotations

import json
import socket


def test_generate_streams_to_stdout_against_a_server(server, run_cli):
    res = run_cli("generate", "--url", server.url, "--api-key", server.api_key, "--max-tokens", "8",
                  "--temperature", "0", "--system", "Answer briefly.", "Name a colour.")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip()
    assert "tokens" in res.stderr and "tok/s" in res.stderr and "Traceback" not in res.stderr


def test_generate_json_with_the_prompt_on_stdin_over_ollama(server, run_cli):
    res = run_cli("generate", "--url", server.url, "--api-key", server.api_key, "--api", "ollama", "--json",
                  "--max-tokens", "5", "--ignore-eos", "--seed", "3", input="Say something nice.\n")
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    assert result["text"] and result["finish_reason"] == "length"
    assert result["usage"]["completion_tokens"] == 5 and result["num_tokens"] == 5
    assert result["model"] and result["duration_s"] > 0


def test_generate_in_process_matches_the_server(server, run_cli):
    args = ["--json", "--max-tokens", "6", "--temperature", "0", "--ignore-eos", "Write one word."]
    local = run_cli("generate", *args, timeout=240)
    assert local.returncode == 0, local.stderr
    assert "loading model" in local.stderr or "converting" in local.stderr  # the progress line
    remote = run_cli("generate", "--url", server.url, "--api-key", server.api_key, *args)
    assert remote.returncode == 0, remote.stderr
    local_result, remote_result = json.loads(local.stdout), json.loads(remote.stdout)
    assert local_result["usage"]["completion_tokens"] == 6
    assert local_result["text"] == remote_result["text"]  # same model, greedy: the same answer
    assert local_result["model"] == remote_result["model"]


def test_generate_reports_http_and_connection_errors(server, run_cli):
    res = run_cli("generate", "--url", server.url, "--api-key", "wrong", "hi")
    assert res.returncode == 1 and "401" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("generate", "--url", server.url, "--api-key", server.api_key, "--temperature", "-1", "hi")
    assert res.returncode == 1 and "400" in res.stderr and "temperature" in res.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = run_cli("generate", "--url", f"http://127.0.0.1:{port}", "--timeout", "5", "hi")
    assert res.returncode == 1 and "error" in res.stderr and "Traceback" not in res.stderr


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


def test_generate_json_schema_in_process_and_against_a_server(server, run_cli, tmp_path):
    import jsonschema

    schema_file = tmp_path / "person.schema.json"
    schema_file.write_text(json.dumps(PERSON))
    args = ["--json", "--json-schema", str(schema_file), "--max-tokens", "60", "--temperature", "0",
            "Invent a person."]
    local = run_cli("generate", *args, timeout=240)
    assert local.returncode == 0, local.stderr
    remote = run_cli("generate", "--url", server.url, "--api-key", server.api_key, *args)
    assert remote.returncode == 0, remote.stderr
    for res in (local, remote):
        result = json.loads(res.stdout)
        assert result["finish_reason"] == "stop", result
        jsonschema.validate(json.loads(result["text"]), PERSON)
    assert json.loads(local.stdout)["text"] == json.loads(remote.stdout)["text"]


def test_generate_json_schema_errors_are_clear(server, run_cli, tmp_path):
    missing = run_cli("generate", "--json-schema", str(tmp_path / "nope.json"), "hi")
    assert missing.returncode == 2 and "nope.json" in missing.stderr and "Traceback" not in missing.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    res = run_cli("generate", "--json-schema", str(bad), "hi")
    assert res.returncode == 2 and "JSON object" in res.stderr
    uncompilable = tmp_path / "uncompilable.json"
    uncompilable.write_text(json.dumps({"type": "string", "pattern": "([a-z"}))
    res = run_cli("generate", "--url", server.url, "--api-key", server.api_key, "--json-schema",
                  str(uncompilable), "hi")
    assert res.returncode == 1 and "400" in res.stderr and "Traceback" not in res.stderr
