"""The README and docs/ stay true: the README is short, every relative link leads somewhere, and
every ``tfcovid`` command they show is accepted by the real command line.

Every command in a code block of README.md or docs/*.md (and every inline ``tfcovid ...``) is
parsed by click against ``tfcovid.cli.main``: a concrete command with ``make_context`` (every
command, option and value must be accepted; nothing runs), a synopsis such as
``tfcovid fit [--task binary|multilabel]`` option by option, every listed value of a
``click.Choice`` / ``IntRange`` converted. Existence checks on paths are off while parsing (the
docs name files such as ``vgg16_first7.pth`` that are not here).

Run for real (``test_cheap_commands_run_for_real``), on tiny data in a temporary folder:
``tfcovid --help`` and every ``tfcovid COMMAND --help``, ``tfcovid configs``,
``tfcovid demo-data demo --per-class 20``, the README's main job ``tfcovid fit --backbone vgg16
--freeze first7`` made tiny (``--epochs 1 --image-size 32 --batch-size 4`` and 4 demo images per
class), ``tfcovid report runs/`` and ``tfcovid report runs/ --markdown tables.md`` on that run,
and ``tfcovid evaluate RUN``. The rest (fits at 224 px, export, explain, import-torch, prepare,
bench, multi-worker) are parsed only; their behaviour is tested in their own test files.
The TFLite/ONNX pixel recipe in docs/inference.md is run by tests/test_export.py.
"""

import re
import shlex
import unicodedata
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from tfcovid import cli

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^( *)```(\w*)\n(.*?)^\1```", re.M | re.S)
SHELL_BLOCKS = {"", "bash", "sh", "shell", "console", "text"}
# The README's main job, made tiny: one epoch of 32 px images, 4 demo images per class.
TINY_FIT = ["--epochs", "1", "--image-size", "32", "--batch-size", "4", "--set", "data.demo_per_class=4"]


def _blocks(text):
    """(language, body) of every fenced code block, indented fences included."""
    for indent, lang, body in FENCE.findall(text):
        yield lang, "\n".join(line[len(indent):] for line in body.splitlines())


def _prose(text):
    return FENCE.sub("", text)


def _logical_lines(body):
    """Lines with backslash continuations joined, and a synopsis's indented ``[--option]``
    lines joined to the ``tfcovid`` line they continue."""
    out = []
    for line in body.splitlines():
        if out and out[-1].endswith("\\"):
            out[-1] = out[-1][:-1] + " " + line.strip()
        elif out and "tfcovid " in out[-1] and re.match(r"\s+(\[|--)", line):
            out[-1] += " " + line.strip()
        else:
            out.append(line)
    return out


def _commands_in(segment_source):
    """The ``tfcovid ...`` commands of one shell line (after ``&&``, env assignments dropped)."""
    for segment in segment_source.split("&&"):
        segment = re.sub(r"^\s*(\$\s+)?([A-Z_][A-Z0-9_]*=\S+\s+)*", "", segment)
        if segment.startswith("tfcovid "):
            yield segment


def shown_commands():
    """(page, text, synopsis?) for every tfcovid command shown in the README and docs/."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for lang, body in _blocks(text):
            if lang not in SHELL_BLOCKS:
                continue
            for line in _logical_lines(body):
                for command in _commands_in(line):
                    synopsis = any(mark in command for mark in ("[", "|", "...", "…"))
                    found.append((page.name, command, synopsis))
        for span in re.findall(r"`(tfcovid [^`]+)`", _prose(text)):
            found.append((page.name, span.replace("\\|", "|"), True))
    return found


def _placeholder(value):
    return any(c.isupper() for c in value) or value in ("", "...", "…")


@pytest.fixture
def no_exists_checks(monkeypatch):
    """Parse paths without requiring them to exist (the docs' paths are examples)."""
    for command in cli.main.commands.values():
        for param in command.params:
            if isinstance(param.type, click.Path) and param.type.exists:
                monkeypatch.setattr(param.type, "exists", False)


def _command(name, where):
    command = cli.main.commands.get(name)
    assert command is not None, f"{where}: no command 'tfcovid {name}' (there are: {', '.join(cli.main.commands)})"
    return command


def _accepts(param, value, ctx, where):
    for alternative in value.split("|"):
        if _placeholder(alternative):
            continue
        try:
            param.type.convert(alternative, param, ctx)
        except click.BadParameter as err:
            raise AssertionError(f"{where}: {param.human_readable_name} does not accept {alternative!r}: {err.message}")


def check_synopsis(argv, where):
    """Every option of a usage line exists, and every listed value is accepted."""
    if _placeholder(argv[0]):  # tfcovid COMMAND --help
        return
    command = _command(argv[0], where)
    ctx = click.Context(command, info_name=argv[0], parent=click.Context(cli.main, info_name="tfcovid"))
    options = {name: p for p in command.params if isinstance(p, click.Option)
               for name in (*p.opts, *p.secondary_opts)}
    arguments = [p for p in command.params if isinstance(p, click.Argument)]
    pending, position = None, 0
    for raw in argv[1:]:
        token = raw.strip("[]").removesuffix("...").removesuffix("…").strip("[]")
        if token.startswith("--"):
            name, _, value = token.partition("=")
            for alternative in name.split("|"):
                assert alternative in options or alternative == "--help", (
                    f"{where}: 'tfcovid {argv[0]}' has no option {alternative}")
            option = options.get(name.split("|")[0])
            takes_value = option is not None and not option.is_flag and not option.count
            if value and takes_value:
                _accepts(option, value, ctx, where)
            pending = option if takes_value and not value else None
        elif pending is not None:
            _accepts(pending, token, ctx, where)
            pending = None
        elif token:
            assert position < len(arguments), f"{where}: 'tfcovid {argv[0]}' takes no argument {token!r}"
            _accepts(arguments[position], token, ctx, where)
            if arguments[position].nargs != -1:
                position += 1


def check_concrete(argv, where):
    """The command parses exactly as click would parse it before running it."""
    group = click.Context(cli.main, info_name="tfcovid")
    command = _command(argv[0], where)
    try:
        command.make_context(argv[0], list(argv[1:]), parent=group, resilient_parsing=False)
    except click.exceptions.Exit as done:  # --help
        assert done.exit_code == 0, where
    except click.ClickException as err:
        raise AssertionError(f"{where}: click refuses it: {err.format_message()}") from None


def test_the_docs_show_commands_to_check():
    commands = shown_commands()
    pages = {page for page, _, _ in commands}
    assert {"README.md", "cli.md", "training.md", "inference.md", "distributed.md"} <= pages
    assert sum(not synopsis for _, _, synopsis in commands) >= 20


@pytest.mark.parametrize("page, command, synopsis", shown_commands(),
                         ids=lambda v: v if isinstance(v, str) and len(v) < 40 else None)
def test_every_shown_command_parses(page, command, synopsis, no_exists_checks):
    argv = shlex.split(command, comments=True)[1:]
    where = f"{page}: {command!r}"
    if argv == ["--help"]:
        assert CliRunner().invoke(cli.main, ["--help"]).exit_code == 0
    elif synopsis:
        check_synopsis(argv, where)
    else:
        check_concrete(argv, where)


def test_the_synopsis_check_finds_mistakes(no_exists_checks):
    """The checker fails on a wrong option, a wrong choice value and a wrong command."""
    for bad in (["fit", "[--taks", "binary]"], ["fit", "[--task", "binary|triple]"],
                ["bench", "pipeline|modle"], ["fitt", "--epochs", "2"]):
        with pytest.raises(AssertionError):
            check_synopsis(bad, "test")
    with pytest.raises(AssertionError):
        check_concrete(["evaluate", "RUN", "--split", "testing"], "test")
    with pytest.raises(AssertionError):
        check_concrete(["import-torch", "m.pth", "--backbone", "vgg16"], "test")  # --task, --out missing



def test_the_command_reference_lists_every_command_and_option():
    """docs/cli.md's synopsis says "every command with every option": a user missed `tfcovid cv`,
    fit's --folds/--fold/--allow-duplicates and bench's --augment-on/--device-cache-mb there."""
    _, body = next(_blocks((ROOT / "docs" / "cli.md").read_text()))
    lines = [line for line in _logical_lines(body) if line.startswith("tfcovid ")]
    missing = []
    for name, command in cli.main.commands.items():
        shown = " ".join(line for line in lines if line.split()[1] == name)
        assert shown, f"docs/cli.md's synopsis has no 'tfcovid {name}' line"
        missing += [f"{name} {opt}" for p in command.params if isinstance(p, click.Option)
                    for opt in p.opts if opt != "--help" and not re.search(rf"{re.escape(opt)}(?![\w-])", shown)]
    assert missing == [], f"docs/cli.md's synopsis lacks: {', '.join(missing)}"

def test_the_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail into docs/"
    assert "Not for clinical use" in README.read_text()


def test_the_readme_python_example_is_the_tested_one():
    """Every line of the README's Python example is in docs/python-api.md, whose example
    tests/test_api.py runs (comments aside)."""
    api = (ROOT / "docs" / "python-api.md").read_text()
    (block,) = [body for lang, body in _blocks(README.read_text()) if lang == "python"]
    for line in block.splitlines():
        code = line.split("  #")[0].rstrip()
        assert code in api, f"README.md's Python example has {code!r}, not in docs/python-api.md's example"


def _anchors(page):
    """GitHub's heading anchors of a Markdown page."""
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", _prose(page.read_text()), flags=re.M):
        slug = unicodedata.normalize("NFC", heading.strip().lower())
        slug = re.sub(r"[^\w\- ]", "", slug).replace(" ", "-")
        anchors.add(slug)
    return anchors


def broken_links(page):
    """The relative links of ``page`` whose file, or heading in a .md file, does not exist."""
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", _prose(page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # https://, mailto:
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no file {path})")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target} (no heading #{anchor} in {file.name})")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    assert not broken_links(page), f"{page.name}: broken links: {broken_links(page)}"


def test_the_link_check_finds_mistakes(tmp_path):
    (tmp_path / "a.md").write_text("# Top\n\n## Large datasets: `tfcovid prepare`\n")
    page = tmp_path / "b.md"
    page.write_text("[ok](a.md#large-datasets-tfcovid-prepare) [ok](a.md) [web](https://x.org/y)\n"
                    "[no file](c.md) [no heading](a.md#nothing)\n```\n[in code](d.md)\n```\n")
    assert broken_links(page) == ["c.md (no file c.md)", "a.md#nothing (no heading #nothing in a.md)"]


def _shown(page, command):
    """``command``'s arguments, checked to be one of ``page``'s shown commands (so the docs and
    what runs here cannot drift apart)."""
    argv = shlex.split(command, comments=True)[1:]
    shown = [shlex.split(c, comments=True)[1:] for p, c, _ in shown_commands() if p == page]
    assert argv in shown, f"{page} no longer shows {command!r}; update test_docs.py"
    return argv


def _run(argv):
    result = CliRunner().invoke(cli.main, argv, prog_name="tfcovid", catch_exceptions=False)
    assert result.exit_code == 0, f"tfcovid {' '.join(argv)}:\n{result.output}"
    return result.output


def test_help_runs_for_real():
    assert "Not for clinical use" in _run(_shown("cli.md", "tfcovid --help"))
    assert "--backbone" in _run(_shown("cli.md", "tfcovid fit --help"))
    for name in cli.main.commands:
        assert "Usage: tfcovid " + name in _run([name, "--help"])


def test_configs_runs_for_real():
    listed = _run(_shown("README.md", "tfcovid configs"))
    for row in ("part1/vgg16_first7.yaml", "part2/resnet18_focal.yaml"):
        assert row in listed


@pytest.mark.slow
def test_cheap_commands_run_for_real(tmp_path, monkeypatch):
    """demo-data, the README's main job (tiny), report and evaluate, as the docs show them."""
    monkeypatch.chdir(tmp_path)
    _run(_shown("data.md", "tfcovid demo-data demo --per-class 20"))
    assert len(list((tmp_path / "demo" / "train" / "infected").iterdir())) == 20

    output = _run(_shown("README.md", "tfcovid fit --backbone vgg16 --freeze first7") + TINY_FIT)
    assert "| VGG16 | first 7 conv | 1 |" in output
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "metrics.json").is_file() and (run_dir / "checkpoints" / "last.keras").is_file()

    assert "| VGG16 | first 7 conv | 1 |" in _run(_shown("README.md", "tfcovid report runs/"))
    _run(_shown("training.md", "tfcovid report runs/ --markdown tables.md"))
    assert "| VGG16 | first 7 conv | 1 |" in (tmp_path / "tables.md").read_text()

    argv = _shown("inference.md", "tfcovid evaluate RUN")
    _run([str(run_dir) if a == "RUN" else a for a in argv])
    assert (run_dir / "eval" / "test.json").is_file()
