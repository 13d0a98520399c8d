"""The CLI's help describes real behaviour, and commands fail cleanly when nothing runs."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from loraserve.cli import app

runner = CliRunner()

HELP_CASES = [
    # (command, words its help must contain)
    ([], ["up", "push", "adapters", "generate", "status", "demo"]),
    (["up"], ["--model", "--broker-url", "--qdrant-url", "random-weight", "Ctrl-C"]),
    (["push"], ["ADAPTER_DIR", "--tag", "--domain", "--samples", "progress", "READY"]),
    (["adapters"], ["--base-model", "--tag", "--json", "page"]),
    (["generate"], ["PROMPT", "--adapter", "--strategy", "--max-tokens", "--stream", "Retrieve"]),
    (["status"], ["Health", "executor", "pool"]),
    (["demo"], ["mixed-task", "--keep"]),
]


@pytest.mark.parametrize(("command", "words"), HELP_CASES)
def test_help_describes_behaviour(command, words):
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    for word in words:
        assert word.lower() in result.output.lower(), f"{command}: {word!r} missing from help"


def test_generate_without_stack_fails_cleanly(tmp_path, monkeypatch):
    monkeypatch.setenv("LORASERVE_RETRIEVER_ADDRESS", "127.0.0.1:1")
    result = runner.invoke(app, ["generate", "hello", "--data-dir", str(tmp_path), "--no-stream"])
    assert result.exit_code == 1
    assert "UNAVAILABLE" in result.output


def test_push_missing_dir_is_a_usage_error(tmp_path):
    result = runner.invoke(app, ["push", str(tmp_path / "nope")])
    assert result.exit_code == 2
