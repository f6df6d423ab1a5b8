"""The documents agree with the code and with docs/RESULTS.md: links and anchors resolve, the README's command lines
parse with their scripts' own parsers, and every figure the README quotes is one RESULTS.md measured."""

import argparse
import glob
import importlib.util
import os
import re
import shlex

import pytest
from conftest import ROOT

DOCUMENTS = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FIGURE = re.compile(r"(?<![\w.,/-])\d{1,3}(?:,\d{3})*\.\d+(?![\w.])")  # 39.0, 1,347.1; not 2.13.0, Qwen2.5, 0.5B


def anchors(path: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    found = set()
    in_code = False
    for line in open(path, encoding="utf-8"):
        in_code ^= line.startswith("```")
        if not in_code and (heading := re.match(r"#+\s+(.*)", line)):
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            found.add(slug)
    return found


@pytest.mark.parametrize("document", DOCUMENTS, ids=os.path.basename)
def test_every_relative_link_and_anchor_resolves(document):
    broken = []
    for target in LINK.findall(open(document, encoding="utf-8").read()):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(document), path)) if path else document
        if not os.path.exists(resolved):
            broken.append(f"{target}: no {os.path.relpath(resolved, ROOT)}")
        elif anchor and resolved.endswith(".md") and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading '#{anchor}' in {os.path.relpath(resolved, ROOT)}")
    assert not broken, broken


def readme_commands() -> list[str]:
    """The README's shell lines, continuation lines joined, comments dropped."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    lines = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


class Parsed(Exception):
    pass


def parse_with_the_scripts_parser(script: str, argv: list[str], monkeypatch) -> argparse.Namespace:
    """Run the script's main(argv) until its parser has parsed: the flags must be its own, the values valid."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.syspath_prepend(os.path.dirname(script))
    spec = importlib.util.spec_from_file_location(f"readme_{os.path.basename(script)[:-3]}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(Parsed) as parsed:
        module.main(argv)
    return parsed.value.args[0]


def test_every_readme_command_names_a_script_that_exists_and_parses(monkeypatch):
    checked = 0
    for line in readme_commands():
        words = [w for w in shlex.split(line) if not re.match(r"^[A-Z_]+=", w)]  # VAR=value prefixes
        if not words or words[0] not in ("python", "bash"):
            continue
        script = os.path.join(ROOT, words[1])
        assert os.path.isfile(script), f"README: `{line}` names {words[1]}, which does not exist"
        if words[0] == "python" and not words[1].startswith("eval_lmms"):  # lmms-eval parses its own flags
            parse_with_the_scripts_parser(script, words[2:], monkeypatch)
        checked += 1
    assert checked >= 5


def test_every_figure_the_readme_quotes_was_measured_in_results():
    results = open(os.path.join(ROOT, "docs", "RESULTS.md"), encoding="utf-8").read()
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    readme = re.sub(r"```.*?```", "", readme, flags=re.S)  # commands, not figures
    missing = sorted({figure for figure in FIGURE.findall(readme) if figure not in results})
    assert not missing, f"README figures not in docs/RESULTS.md: {missing}"


def test_the_test_command_the_readme_names_is_the_one_ci_runs():
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    assert "scripts/test.sh" in ci and any(line.startswith("bash scripts/test.sh") for line in readme_commands())


def test_a_broken_link_a_wrong_flag_and_an_unmeasured_figure_are_caught(tmp_path, monkeypatch):
    """The checks above can fail: each meets one thing broken on purpose."""
    document = tmp_path / "doc.md"
    document.write_text("# Title\n[a](#title) [b](#nowhere) [c](missing.md)\n")
    with pytest.raises(AssertionError, match="nowhere.*missing.md"):
        test_every_relative_link_and_anchor_resolves(str(document))
    with pytest.raises(SystemExit):
        parse_with_the_scripts_parser(os.path.join(ROOT, "scripts", "merge_lora.py"), ["--no_such_flag"],
                                      monkeypatch)
    assert FIGURE.findall("SFT 39.0, 1,347.1 s; torch 2.13.0, Qwen2.5, 0.5B") == ["39.0", "1,347.1"]

