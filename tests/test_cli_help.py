"""`saelab --help` and every command's --help: each option shows its default, --model says what
a hub name does offline, and the top-level help points to the metrics glossary."""

import argparse
from pathlib import Path

from saelab import cli
from saelab.commands.options import shown

ROOT = Path(__file__).resolve().parents[1]


def _subparsers() -> dict:
    return next(a for a in cli.build_parser()._actions if a.dest == "command").choices


def _default(parser: argparse.ArgumentParser, action: argparse.Action):
    """The option's default as it applies, also where options.defaults_apart hides it from argparse."""
    if action.default is argparse.SUPPRESS:
        return parser._defaults.get("option_defaults", {}).get(action.dest)
    return action.default


def _help_line(parser: argparse.ArgumentParser, option: str) -> str:
    """`option`'s entry as `parser.format_help()` prints it, joined onto one line."""
    action = next(a for a in parser._actions if option in a.option_strings)
    return " ".join(parser._get_formatter()._format_action(action).split())


def test_every_option_with_a_default_shows_it_in_help():
    checked = 0
    for name, parser in _subparsers().items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            default = _default(parser, action)
            if not action.option_strings or action.dest == "help" or default is None or default is False:
                continue
            text = formatter._expand_help(action) if action.help else ""
            assert "default:" in text, f"saelab {name} {action.option_strings[0]}: help does not show its default"
            checked += 1
    assert checked > 100  # every command's options were walked, not an empty list


def test_help_adds_the_value_where_the_text_does_not_state_it():
    dashboard = _subparsers()["dashboard"]
    depth = next(a for a in dashboard._actions if a.dest == "tree_depth")
    assert f"(default: {shown(_default(dashboard, depth))})" in _help_line(dashboard, "--tree-depth")
    steer = _subparsers()["steer"]
    assert "(default: 0)" in _help_line(steer, "--temperature")  # stated in words: not added twice
    assert _help_line(steer, "--temperature").count("default") == 1


def test_model_help_says_what_a_hub_name_does_offline():
    text = " ".join(_subparsers()["dashboard"].format_help().split())
    assert "hub id" in text and "needs the internet" in text and "offline, it fails" in text


def test_top_level_help_points_to_the_metrics_glossary():
    assert "docs/metrics.md" in cli.build_parser().format_help()
    assert (ROOT / "docs" / "metrics.md").is_file()
    assert "docs/metrics.md" in (ROOT / "README.md").read_text()
