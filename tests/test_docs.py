"""Docs that cannot drift: every relative link resolves, docs/params.md lists exactly the keys of
params.yaml with their defaults and the ranges params.py enforces (each range tried at both ends),
and the commands README shows parse against the real command-line tools."""

from __future__ import annotations

import math
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import with_param

from pipeline_lib.base.params import ParamsError, parse_params

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a web address or a heading of the same page
            path = target.split("#")[0]
            if not (page.parent / path).exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert not broken, "links to nothing:\n" + "\n".join(broken)


def leaf_keys(tree: dict, prefix: str = "") -> dict:
    """params.yaml's keys as dotted paths -> values."""
    found = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            found |= leaf_keys(value, f"{prefix}{key}.")
        else:
            found[f"{prefix}{key}"] = value
    return found


def reference() -> dict[str, tuple[object, str]]:
    """docs/params.md's rows: key -> (default, values)."""
    rows = {}
    row = re.compile(r"^\| `([a-z_.]+)` \| `([^`]*)` \| ([^|]*) \|")
    for line in (REPO / "docs" / "params.md").read_text().splitlines():
        if found := row.match(line):
            key, default, values = found.groups()
            assert key not in rows, f"{key} listed twice"
            rows[key] = (yaml.safe_load(default), values.strip())
    return rows


def test_the_params_reference_lists_every_key_with_its_default():
    keys = leaf_keys(yaml.safe_load((REPO / "params.yaml").read_text()))
    listed = reference()
    assert sorted(set(keys) - set(listed)) == [], "keys of params.yaml missing in docs/params.md"
    assert sorted(set(listed) - set(keys)) == [], "docs/params.md lists keys params.yaml lacks"
    wrong = {k: (listed[k][0], v) for k, v in keys.items() if listed[k][0] != v}
    assert not wrong, f"defaults differ (docs, params.yaml): {wrong}"


def set_key(raw: dict, key: str, value) -> dict:
    """`with_param`, and min_side <= max_side kept where one of them is set."""
    changed = with_param(raw, key, value)
    if key == "data.synthetic.min_side":  # min_side <= max_side
        changed["data"]["synthetic"]["max_side"] = max(value, 32) if isinstance(value, int) else 32
    if key == "data.synthetic.max_side":
        changed["data"]["synthetic"]["min_side"] = 32
    return changed


def boundary_cases(values: str) -> list[tuple[object, bool]]:
    """(value, accepted) at both ends of a documented range: `integer a … b`, `integer ≥ a`,
    `integer > a`, `number in [a, b)` (any brackets), `number ≥ a`, `number > a`, `one of ...`,
    `list of a … b of ..., each once`."""
    number = r"(-?\d+(?:\.\d+)?)"
    if found := re.search(rf"integer {number} … {number}", values):
        low, high = int(found[1]), int(found[2])
        return [(low, True), (low - 1, False), (high, True), (high + 1, False)]
    if found := re.search(rf"integer ([≥>]) {number}", values):
        low = int(found[2])
        return [(low, found[1] == "≥"), (low - 1, False), (low + 1, True)]
    if found := re.search(rf"number in ([\[(]){number}, {number}([\])])", values):
        low, high, eps = float(found[2]), float(found[3]), 1e-6
        return [
            (low, found[1] == "["),
            (low - eps, False),
            (low + eps, True),
            (high, found[4] == "]"),
            (high - eps, True),
            (high + eps, False),
        ]
    if found := re.search(rf"number ([≥>]) {number}", values):
        low = float(found[2])
        return [(low, found[1] == "≥"), (low - 1e-6, False), (low + 1e-6, True)]
    if found := re.search(rf"list of {number} … {number} of (.*), each once", values):
        low, high = int(found[1]), int(found[2])
        choices = re.findall(r"`([^`]+)`", found[3])
        return [
            (choices[:low], True),
            (choices[: low - 1], False),
            (choices[:high], True),
            (choices[:high] + choices[:1], False),  # one more: a repeat
            (["none of these"], False),
        ]
    if values.startswith("one of"):
        choices = re.findall(r"`([^`]+)`", values)
        return [(choice, True) for choice in choices] + [("none of these", False)]
    if values == "true or false":
        return [(True, True), (False, True), ("yes", False), (1, False)]
    return []


def accepted(raw: dict) -> bool:
    try:
        parse_params(raw)
    except ParamsError:
        return False
    return True


# Values that a range admits but another rule refuses, with the rule (not a range's end).
CROSS_RULES = {
    ("data.download", True): "download fetches VOC2012 only, into a folder named VOCdevkit",
    ("head.grid_kind", "lab"): "grid.assign: neighbours (the default) needs head.grid_kind conv",
}
# Keys whose whole range holds with the conv grid head only (the default, fcos, refuses anchors
# and wants its towers a multiple of 32 wide: test_params checks those rules).
CONV_CONTEXT = {"grid.anchors", "head.tower_width"}


@pytest.mark.parametrize("key", sorted(reference()))
def test_every_documented_range_holds_at_both_ends(key):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert accepted(raw)
    if key in CONV_CONTEXT:
        raw = set_key(raw, "head.grid_kind", "conv")
    cases = boundary_cases(reference()[key][1])
    for value, expected in cases:
        if not isinstance(value, list) and (key, value) in CROSS_RULES:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            continue
        assert accepted(set_key(raw, key, value)) == expected, (key, value, expected)


def readme_commands() -> list[str]:
    """The `make`, `dvc` and `python -m stages.…` command lines of README's console blocks."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```(?:console|bash)\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = line.removeprefix("$ ").split("  #")[0].strip()
            if re.match(r"(make|dvc|\.venv/bin/python -m stages\.|python -m stages\.)", line):
                commands.append(line)
    return commands


def options_of(words: list[str]) -> list[str]:
    return [w.split("=")[0] for w in words if w.startswith("-")]


@pytest.mark.parametrize("command", readme_commands())
def test_readme_commands_parse_against_the_real_tools(command):
    words = shlex.split(command)
    bin_dir = Path(sys.executable).parent
    if words[0] == "make":
        targets = re.findall(r"^([a-z-]+):", (REPO / "Makefile").read_text(), re.M)
        assert all(w in targets for w in words[1:] if "=" not in w), command
        return
    if words[0] == "dvc":
        sub = [w for w in words[1:3] if not w.startswith("-")]
        if sub and sub[0] in ("exp", "queue", "metrics", "plots", "params", "remote"):
            sub = sub[:2]
        else:
            sub = sub[:1]
        help_command = [str(bin_dir / "dvc"), *sub, "--help"]
    else:
        module = words[words.index("-m") + 1]
        rest = words[words.index("-m") + 2 :]
        help_command = [sys.executable, "-m", module, "--help"]
        top = subprocess.run(help_command, cwd=REPO, capture_output=True, text=True, timeout=120)
        if "Commands" in top.stdout:  # a command group: the first word names the command
            help_command = [sys.executable, "-m", module, rest[0], "--help"]
    done = subprocess.run(help_command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{help_command}: {done.stderr}"
    for option in options_of(words):
        assert option in done.stdout, f"{command}: {option} is not an option of {help_command}"
