"""The flags are generated from WorkerConfig: fields, defaults, `--help` and the README table agree."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from llava_worker.cli import build_parser, config_from_args
from llava_worker.config import WorkerConfig
from llava_worker.flags import attribute_docs, config_flags, flags_table

REPO = Path(__file__).resolve().parents[2]
FIELDS = [field.name for field in dataclasses.fields(WorkerConfig)]


def readme_flags_table() -> str:
    """The README's table: from its `| flag |` header line to the first blank line."""
    lines = (REPO / "README.md").read_text().splitlines()
    start = lines.index("| flag | default | meaning |")
    end = lines.index("", start)
    return "\n".join(lines[start:end])


def test_readme_table_is_the_generated_one():
    assert readme_flags_table() == flags_table(), "README.md is stale: paste `python scripts/flags_table.py` into it"


def test_table_shows_defaults_readably():
    rows = {row.split(" | ")[0].removeprefix("| "): row for row in flags_table().splitlines()}
    assert "| `--max-request-bytes` | `67108864` (64 MiB) |" in rows["`--max-request-bytes`"]
    assert "| `--multi-modal` | off |" in rows["`--multi-modal`"]
    assert "| `--model-base` | none |" in rows["`--model-base`"]
    assert "One of `cuda`, `cpu`, `mps`." in rows["`--device`"]


def test_every_field_is_a_flag_and_every_flag_a_field():
    options = {action.dest for action in build_parser()._actions if action.dest != "help"}
    assert options == set(FIELDS)
    assert [flag.name for flag in config_flags()] == FIELDS


def test_every_field_has_a_docstring():
    docs = attribute_docs(WorkerConfig)
    assert set(docs) == set(FIELDS)
    assert all(docs[name] for name in FIELDS)


def test_no_arguments_give_the_dataclass_defaults():
    parsed, default = config_from_args([]), WorkerConfig()
    for name in FIELDS:
        assert getattr(parsed, name) == getattr(default, name), name
    assert parsed == default


def test_help_names_every_flag_with_its_docstring(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as exit_info:
        config_from_args(["--help"])
    assert exit_info.value.code == 0
    # argparse rewraps the help texts; compare with whitespace collapsed.
    text = " ".join(capsys.readouterr().out.split())
    for flag in config_flags():
        assert flag.option in text
        first_words = " ".join(flag.help.split()[:4])
        assert first_words in text, f"{flag.option}: {first_words!r} missing from --help"


def test_multi_modal_help_says_what_it_does():
    (flag,) = [flag for flag in config_flags() if flag.name == "multi_modal"]
    assert flag.help.startswith("Require image support: refuse to start unless the loaded model takes images")


def test_flags_reach_the_config():
    config = config_from_args(["--max-images", "3", "--device", "cpu", "--load-4bit", "--max-prompt-tokens", "100"])
    assert (config.max_images, config.device, config.load_4bit, config.max_prompt_tokens) == (3, "cpu", True, 100)
    config = config_from_args(["--heartbeat-interval", "2.5", "--controller-timeout", "1", "--log-file", "w.log"])
    assert (config.heartbeat_interval, config.controller_timeout, config.log_file) == (2.5, 1.0, "w.log")
    assert not config.load_4bit


@pytest.mark.parametrize("argv", [["--device", "tpu"], ["--max-images", "three"], ["--no-such-flag"]])
def test_bad_flags_exit_with_status_2(argv: list[str], capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as exit_info:
        config_from_args(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.subprocess
def test_help_answers_without_torch():
    # A None entry in sys.modules makes any import of that module fail.
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; "
        "from llava_worker.cli import main; main(['--help'])"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--model-path" in result.stdout
