"""The documentation's commands parse, its links resolve, and its front page stays short.

Every fenced shell command in README.md and docs/*.md that runs `python train.py`, `python eval.py`
(also under torchrun) or `python -m MODULE` must be accepted as written: train.py's and eval.py's
own parsers take its arguments, `-m` names an importable module, and a module of this project
parses the arguments with its own parser. Placeholders a reader replaces (PLACEHOLDERS) are
substituted by example values first. Nothing is run.
"""

import argparse
import importlib
import importlib.util
import os
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
FRONT_PAGE_MAX_LINES = 160
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
# Words in commands that stand for the reader's own value, and what the test puts in their place.
PLACEHOLDERS = {"NAME": "preresnet20-example", "RUN": "runs/example", "OWNER": "example", "HOST": "localhost",
                "DIR": "/tmp/example", "OUT": "runs/example"}
SCRIPTS = ("train.py", "eval.py")
OWN_PACKAGES = ("bench", "preresnet", "tools")


def documents() -> list[Path]:
    return [README, *PAGES]


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block."""
    return [(m.group(1).strip().lower(), m.group(2)) for m in re.finditer(r"^```([^\n`]*)\n(.*?)^```\s*$", text,
                                                                            flags=re.MULTILINE | re.DOTALL)]


def shell_commands(text: str) -> list[list[str]]:
    """The simple commands of every shell block: continuation lines joined, comments dropped, split at
    && || ; and |, leading VAR=value assignments removed."""
    commands = []
    for language, body in fenced_blocks(text):
        if language not in SHELL_LANGUAGES:
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith("$ "):
                line = line[2:]
            lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
            lexer.whitespace_split = True
            lexer.commenters = "#"
            current: list[str] = []
            for token in lexer:
                if token in (";", "&&", "||", "|", "&"):
                    commands.append(current)
                    current = []
                else:
                    current.append(token)
            commands.append(current)
    return [strip_assignments(command) for command in commands if command]


def strip_assignments(command: list[str]) -> list[str]:
    while command and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", command[0]):
        command = command[1:]
    return command


def substitute(token: str) -> str:
    for word, value in PLACEHOLDERS.items():
        token = re.sub(rf"\b{word}\b", value, token)
    return token


class Parsed(Exception):
    """Raised in place of running a module's main() once its parser has accepted the arguments."""


def classify(command: list[str]) -> tuple[str, str, list[str]] | None:
    """("script", "train.py", args), ("module", "bench.x", args), or None for other commands."""
    if not command:
        return None
    program = Path(command[0]).name
    if program == "torchrun":
        scripts = [i for i, token in enumerate(command) if token.endswith(".py")]
        if not scripts:
            return None
        return "script", Path(command[scripts[0]]).name, command[scripts[0] + 1:]
    if not re.fullmatch(r"python(3(\.\d+)?)?", program) or len(command) < 2:
        return None
    if command[1] == "-m" and len(command) > 2:
        return "module", command[2], command[3:]
    if command[1].endswith(".py"):
        return "script", Path(command[1]).name, command[2:]
    return None


def documented(kind: str) -> list[tuple[str, str, list[str]]]:
    """(document, command line, classified) for every command of that kind, as pytest params."""
    found = []
    for path in documents():
        for command in shell_commands(path.read_text()):
            parsed = classify(command)
            if parsed and parsed[0] == kind:
                found.append(pytest.param(parsed[1], [substitute(t) for t in parsed[2]],
                                          id=f"{path.relative_to(ROOT)}: {shlex.join(command)}"[:180]))
    return found


def parse_module_args(name: str, args: list[str], monkeypatch) -> None:
    """Parse args with the module's own parser: build_parser() where it has one, else its main()
    with ArgumentParser.parse_args stopped right after parsing."""
    module = importlib.import_module(name)
    if hasattr(module, "build_parser"):
        module.build_parser().parse_args(args)
        return
    if not hasattr(module, "main"):
        return  # a module run for its side effects; importable is all that can be checked
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, argv=None, namespace=None):
        original(self, args if argv is None else argv, namespace)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [name, *args])
    # bench.launches sets TRITON_INTERPRET before it parses: leave the session's environment as it was
    if "TRITON_INTERPRET" in os.environ:
        monkeypatch.setenv("TRITON_INTERPRET", os.environ["TRITON_INTERPRET"])
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    try:
        main = module.main
        if "argv" in main.__code__.co_varnames[:main.__code__.co_argcount]:
            main(args)
        else:
            main()
    except Parsed:
        return
    raise AssertionError(f"{name}.main() returned without parsing its arguments")


@pytest.mark.parametrize("script, args", documented("script"))
def test_documented_script_commands_parse(script, args):
    assert script in SCRIPTS, f"a documented command runs {script}, which is not one of {SCRIPTS}"
    module = importlib.import_module(script.removesuffix(".py"))
    try:
        module.build_parser().parse_args(args)
    except SystemExit as exc:
        raise AssertionError(f"{script} refuses {shlex.join(args)} (see the error above)") from exc


@pytest.mark.parametrize("name, args", documented("module"))
def test_documented_module_commands_parse(name, args, monkeypatch):
    assert importlib.util.find_spec(name) is not None, f"python -m {name}: no such module"
    if name.split(".")[0] not in OWN_PACKAGES:
        return
    try:
        parse_module_args(name, args, monkeypatch)
    except SystemExit as exc:
        raise AssertionError(f"python -m {name} refuses {shlex.join(args)} (see the error above)") from exc


def test_the_documented_commands_were_found():
    """The extraction works: the front page and the training page have train.py and eval.py commands,
    and the pages have python -m commands."""
    front = [classify(c) for c in shell_commands(README.read_text())]
    assert {("script", "train.py"), ("script", "eval.py")} <= {c[:2] for c in front if c}
    training = [classify(c) for c in shell_commands((ROOT / "docs" / "training.md").read_text())]
    assert sum(1 for c in training if c and c[1] == "train.py") >= 5
    assert len(documented("module")) >= 10
    assert shell_commands("```bash\nA=1 python x.py --a \\\n  --b 2  # note\nmkdir d && tar -x f\n```\n") == \
        [["python", "x.py", "--a", "--b", "2"], ["mkdir", "d"], ["tar", "-x", "f"]]


def test_front_page_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= FRONT_PAGE_MAX_LINES, f"README.md has {len(lines)} lines; the front page keeps to " \
                                               f"{FRONT_PAGE_MAX_LINES}: move detail to docs/"


def test_front_page_keeps_the_ci_test_command_and_the_generated_tables():
    text = README.read_text()
    # .ci/run runs the lines between the marker's opening fence and the closing fence
    block = re.search(r"^<!-- test-command -->\n```bash\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL)
    assert block and block.group(1) == 'pip install -e ".[dev]"\npytest -n auto\n'
    for table in ("results-table", "performance-table"):
        assert text.count(f"<!-- {table}:start -->") == 1 and text.count(f"<!-- {table}:end -->") == 1, table
        assert text.index(f"<!-- {table}:start -->") < text.index(f"<!-- {table}:end -->"), table


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.MULTILINE | re.DOTALL)
    return {github_anchor(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.MULTILINE)}


def links(path: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.MULTILINE | re.DOTALL)
    return re.findall(r"\]\(([^)\s]+)\)", text)


def test_every_docs_page_the_front_page_links_exists():
    linked = {target.split("#")[0] for target in links(README) if target.startswith("docs/")}
    assert linked, "the front page links no docs/ page"
    missing = sorted(target for target in linked if not (ROOT / target).is_file())
    assert not missing, f"README.md links pages that do not exist: {missing}"
    unlinked = sorted(str(page.relative_to(ROOT)) for page in PAGES if str(page.relative_to(ROOT)) not in linked)
    assert not unlinked, f"docs pages the front page does not link: {unlinked}"


@pytest.mark.parametrize("path", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_their_anchors_resolve(path):
    problems = []
    for target in links(path):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file_part, _, fragment = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            if resolved.name != "pretrained.md":  # written separately; the front-page test requires it
                problems.append(f"{target}: no such file")
            continue
        if fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            problems.append(f"{target}: no heading #{fragment} in {resolved.relative_to(ROOT)}")
    assert not problems, f"{path.relative_to(ROOT)}: " + "; ".join(problems)


def test_models_table_counts_are_the_networks():
    """The front page's parameter counts (ours) are those of the registered networks."""
    import torch

    import preresnet

    rows = re.findall(r"^\| `(\w+)` \| [^|]+ \| [^|]+ \| ([\d.]+)M / [\d.]+M \|", README.read_text(), flags=re.MULTILINE)
    assert [name for name, _ in rows] == preresnet.list_models()
    for name, millions in rows:
        with torch.device("meta"):
            model = preresnet.get_model(name)
        assert f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}" == millions, name


def test_activation_memory_table_is_what_the_command_measures():
    """docs/fused-kernels.md's table is `python -m bench.activation_memory`'s output (meta device:
    exact shapes, the same on every machine; a few seconds)."""
    from bench.activation_memory import measure
    from preresnet.models import MODEL_ARCHS, paper_name

    registry = {paper_name(*arch): name for name, arch in MODEL_ARCHS.items()}
    rows = re.findall(r"^\| ([\w-]+) \| ([\d.]+) MiB \| ([\d.]+) MiB \| (\d+)% \|$",
                      (ROOT / "docs" / "fused-kernels.md").read_text(), flags=re.MULTILINE)
    assert [network for network, *_ in rows] == ["PreResNet-110", "PreResNet-164", "WRN-16-4"]
    for network, unfused, fused, percent in rows:
        result = measure(registry[network], 128)
        measured = (f"{result['unfused_bytes'] / 2**20:.1f}", f"{result['fused_bytes'] / 2**20:.1f}",
                    f"{100 * result['fused_fraction']:.0f}")
        assert (unfused, fused, percent) == measured, network


def test_layer_signature_count_is_the_benchmarks():
    """The number of distinct fused layers docs/fused-kernels.md gives is the one the GPU report and
    the layer-path benchmark time (bench.workloads.layer_signatures)."""
    from bench.workloads import layer_signatures

    counts = re.findall(r"(\d+) layer signatures", (ROOT / "docs" / "fused-kernels.md").read_text())
    assert counts and {int(count) for count in counts} == {len(layer_signatures())}
