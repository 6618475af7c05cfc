"""The README as a newcomer reads it: its commands are extracted and run (on a small budget)
or parsed, its Python runs, and every file it names exists. A README that drifts from the
code fails here."""

import ast
import csv
import os
import re
import shlex

import lightning as L
import pytest

import sail_lightning.data
from sail_lightning.cli import main
from sail_lightning.data import PreferenceDataModule
from tests.conftest import REPO
from tests.test_cli import column, metrics

README = (REPO / "README.md").read_text()
DOCS = {p.name: p.read_text() for p in (REPO / "docs").glob("*.md")}
# Appended to a README command: the same run, a few batches long, logging under tmp.
BUDGET = ["--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
          "--trainer.enable_progress_bar=false", "--data.num_synthetic_pairs=200"]


def marked(name: str, text: str = README) -> str:
    """The body of the code block between ``<!-- name -->`` and ``<!-- /name -->``."""
    match = re.search(rf"<!-- {name} -->\n```\w*\n(.*?)```\n<!-- /{name} -->", text, re.S)
    assert match, f"README has no block marked {name}"
    return match.group(1)


def code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def commands(text: str) -> list[str]:
    """Every shell command of the bash blocks, continuation lines joined."""
    out = []
    for block in code_blocks(text, "bash"):
        out += [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]
    return out


def inline_commands(text: str) -> list[str]:
    """Commands quoted inline in the prose, such as `sail-lightning fit -c ...`."""
    spans = re.findall(r"`((?:\w+=\S+ )*sail-lightning (?:fit|validate) [^`]*)`", text)
    return [" ".join(span.split()) for span in spans]


def fit_args(command: str) -> tuple[dict[str, str], list[str]]:
    """Environment assignments and the arguments after ``sail-lightning`` of a command."""
    words = shlex.split(command.split("&&")[-1])
    env = {}
    while "=" in words[0] and not words[0].startswith("-"):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    # The entry point, or its path in another environment (.venv-vllm/bin/sail-lightning).
    entry = [i for i, w in enumerate(words) if os.path.basename(w) == "sail-lightning"]
    assert entry, command
    # A launcher before it (srun, ...) starts the same command on each node.
    return env, words[entry[0] + 1:]


def run_in(tmp_path, monkeypatch, command: str, *extra: str) -> None:
    """Runs a README command in-process from a folder that has the repo's configs and
    examples, as a fresh clone has them."""
    for name in ("configs", "examples"):
        (tmp_path / name).symlink_to(REPO / name)
    monkeypatch.chdir(tmp_path)
    env, args = fit_args(command)
    for path in env.pop("PYTHONPATH", "").split(os.pathsep):
        if path:
            monkeypatch.syspath_prepend(str(tmp_path / path))
    assert not env, f"unexpected environment in {command!r}"
    main([*args, *BUDGET, *extra])


def test_quickstart_and_test_commands_install_then_run():
    quick, test = marked("quickstart-command").strip(), marked("test-command").strip()
    install = 'pip install torch==2.13.0 && pip install -e ".[dev]"'
    assert quick == f"{install} && sail-lightning fit --config configs/quickstart.yaml"
    # .ci/run executes exactly this block; the vllm tests run in their own environment.
    assert test == f"{install} && pytest && bash .ci/vllm-tests.sh"


FIT_COMMANDS = sorted({c for text in [README, *DOCS.values()]
                       for c in commands(text) + inline_commands(text)
                       if "sail-lightning fit" in c or "sail-lightning validate" in c})


def test_the_readme_has_fit_commands_to_check():
    assert len(FIT_COMMANDS) >= 10


@pytest.mark.parametrize("command", FIT_COMMANDS)
def test_every_documented_command_parses(command, monkeypatch, capsys):
    if "..." in command:
        pytest.skip("an elided command")
    # Placeholders: a method config's name, or any path (nothing is read when parsing).
    command = re.sub(r"<[^>]+>", lambda m: "sail_pr" if m[0] == "<name>" else "placeholder",
                     command)
    env, args = fit_args(command)
    monkeypatch.chdir(REPO)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    asks_help = any(a == "--help" or a.endswith(".help") for a in args)
    with pytest.raises(SystemExit) as exit_:
        main(args if asks_help else [*args, "--print_config"])
    assert exit_.value.code in (0, None), capsys.readouterr().err


def section(title: str) -> str:
    start = README.index(f"## {title}")
    end = README.find("\n## ", start + 1)
    return README[start:end]


def test_own_model_round_trip_as_written(tmp_path, monkeypatch):
    export, refit = commands(section("Your own model"))[-2:]
    assert "ExportPolicyCallback" in export and "model_name_or_path=runs/my_policy" in refit
    run_in(tmp_path, monkeypatch, export)
    assert (tmp_path / "runs" / "my_policy" / "config.json").exists()
    (tmp_path / "configs").unlink()
    (tmp_path / "examples").unlink()
    run_in(tmp_path, monkeypatch, refit, "--trainer.max_epochs=1")
    # The second run of the same method: version_1 beside the export run's version_0.
    rows = list(csv.DictReader((tmp_path / "runs/sail_pr/version_1/metrics.csv").open()))
    assert column(rows, "val/rewards/accuracies")


def test_labeller_example_is_the_file_and_labels_the_rounds(tmp_path, monkeypatch):
    shown = marked("labeller-example")
    source = (REPO / "examples" / "my_labeller.py").read_text()
    assert shown in source  # the README shows the function the file holds
    (command,) = [c for c in commands(section("Your own labeller")) if "my_labeller" in c]
    run_in(tmp_path, monkeypatch, command, "--trainer.max_epochs=2")
    assert column(metrics(tmp_path / "runs"), "gen/round") == [0.0, 1.0]
    # The online pairs were labelled by the example: its score of chosen beats rejected.
    import json

    from my_labeller import score
    (round_file, *_) = sorted((tmp_path / "runs").glob("*/version_*/rounds/round_0001.jsonl"))
    pairs = [json.loads(line) for line in round_file.read_text().splitlines()]
    chosen = score([p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
    rejected = score([p["prompt"] for p in pairs], [p["rejected"] for p in pairs])
    assert pairs and all(c >= r - 1e-6 for c, r in zip(chosen, rejected, strict=True))
    assert [p["scores"]["chosen"] for p in pairs] == pytest.approx(chosen, abs=1e-6)


def test_python_api_snippet_runs(tmp_path, monkeypatch):
    (snippet,) = code_blocks(section("Python API"), "python")
    ast.parse(snippet)

    class Trainer(L.Trainer):  # the snippet's own trainer, a few batches long
        def __init__(self, **kwargs):
            super().__init__(**kwargs, limit_train_batches=2, limit_val_batches=1,
                             default_root_dir=str(tmp_path), enable_progress_bar=False)

    class Data(PreferenceDataModule):  # and a smaller task
        def __init__(self, **kwargs):
            super().__init__(**{**kwargs, "num_synthetic_pairs": 200})

    monkeypatch.setattr(L, "Trainer", Trainer)
    monkeypatch.setattr(sail_lightning.data, "PreferenceDataModule", Data)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(snippet, "README Python API", "exec"), scope)
    assert scope["trainer"].state.finished and scope["trainer"].global_step > 0


# Paths the README names in backticks or links: every one must be in the repository.
PATH = re.compile(r"(?:`|\]\()((?:configs|docs|benchmarks|notebooks|examples|sail_lightning|"
                  r"tests)/[\w./-]+?)(?:`|\)|\s)")


def test_every_named_file_exists():
    named = {p.rstrip(".") for p in PATH.findall(README)}
    assert len(named) > 20
    missing = sorted(p for p in named if "*" not in p and not (REPO / p).exists())
    assert not missing, f"README names files that do not exist: {missing}"


def test_nothing_outside_the_repository():
    for name, text in {"README.md": README, **DOCS}.items():
        assert "../shared" not in text, f"{name} names a path outside the repository"
