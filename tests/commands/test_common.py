"""The commands' shared toolkit: converters, the new-run-directory helper, the one error path."""

from __future__ import annotations

import argparse
import ast
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from bench import commands
from bench.commands import SUBCOMMANDS, common, sweep
from bench.commands.common import UsageError

CONVERTED = [
    (common.names, " a, b ,,c ", ["a", "b", "c"]),
    (common.whole_numbers, "1,2, 8", [1, 2, 8]),
    (common.non_negative_ints, "0,3", [0, 3]),
    (common.positive_floats, "0.5,10", [0.5, 10.0]),
    (common.non_negative_floats, "0,2.5", [0.0, 2.5]),
    (common.positive_int, "4", 4),
    (common.non_negative_int, "0", 0),
    (common.positive_float, "2.5", 2.5),
    (common.choice_list("train", "infer"), "infer,train,infer", ["infer", "train"]),
]
REFUSED = [
    (common.names, ", ,"), (common.whole_numbers, "0"), (common.whole_numbers, "1,x"),
    (common.whole_numbers, "1.5"), (common.whole_numbers, ""), (common.non_negative_ints, "-1"),
    (common.positive_floats, "0"), (common.positive_floats, "nan"),
    (common.positive_floats, "inf"), (common.non_negative_floats, "-0.1"),
    (common.positive_int, "0"), (common.positive_int, "1,2"), (common.non_negative_int, "-1"),
    (common.positive_float, "-2"), (common.positive_float, "nan"),
]


@pytest.mark.parametrize("convert, text, value", CONVERTED)
def test_converters_parse_what_they_accept(convert, text, value):
    assert convert(text) == value


@pytest.mark.parametrize("convert, text", REFUSED)
def test_converters_refuse_with_the_text_in_one_line(convert, text):
    with pytest.raises(argparse.ArgumentTypeError) as error:
        convert(text)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{text!r}: give ")


def test_a_choice_list_names_the_bad_choice_and_the_valid_ones():
    with pytest.raises(argparse.ArgumentTypeError, match="'serve': choose from train, infer"):
        common.choice_list("train", "infer")("train,serve")


def _parser() -> common.OneLineParser:
    parser = common.OneLineParser(prog="run_bench.py demo")
    parser.add_argument("--threads", type=common.whole_numbers, default="1")
    return parser


def test_the_parser_converts_defaults_and_refuses_with_a_usage_error():
    assert _parser().parse_args([]).threads == [1]
    with pytest.raises(UsageError) as error:
        _parser().parse_args(["--threads", "0,x"])
    assert str(error.value) == ("argument --threads: '0,x': give whole numbers >= 1, e.g. 1,2 "
                                "(see --help)")
    with pytest.raises(UsageError, match="unrecognized arguments: --nope"):
        _parser().parse_args(["--nope"])


def test_new_run_directory_creates_a_named_directory(tmp_path):
    directory, run_id = common.new_run_directory(tmp_path / "out", "nightly-1")
    assert (directory, run_id) == (tmp_path / "out" / "nightly-1", "nightly-1")
    assert directory.is_dir()
    made, made_id = common.new_run_directory(tmp_path / "out", None, label="serve")
    assert made.is_dir() and made.name == made_id and "-serve-" in made_id
    planned, _ = common.new_run_directory(tmp_path / "later", "x", create=False)
    assert not planned.exists()


@pytest.mark.parametrize("run_id", ["", ".", "..", "../escaped", "a/b", f"a{os.sep}b"])
def test_a_run_id_that_is_not_a_plain_name_is_refused(tmp_path, run_id):
    with pytest.raises(UsageError, match="plain name"):
        common.new_run_directory(tmp_path / "out", run_id)
    assert not (tmp_path / "out").exists() and not (tmp_path / "escaped").exists()


def test_a_directory_holding_a_run_is_refused_with_the_hint(tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "results.csv").write_text("schema_version\n")
    with pytest.raises(UsageError, match="already holds a run; choose another --run-id"):
        common.new_run_directory(tmp_path, "taken")
    with pytest.raises(UsageError, match=f"finish it with --resume {taken}"):
        common.new_run_directory(tmp_path, "taken", hint="finish it with --resume {directory}")
    (tmp_path / "rounds_only" / "rounds").mkdir(parents=True)
    with pytest.raises(UsageError, match="already holds a run"):
        common.new_run_directory(tmp_path, "rounds_only", occupied=("results.csv", "rounds"))
    # An empty existing directory holds no run.
    (tmp_path / "empty").mkdir()
    assert common.new_run_directory(tmp_path, "empty")[0] == tmp_path / "empty"


def test_an_out_below_a_file_is_refused_before_anything_is_created(tmp_path):
    (tmp_path / "a_file").write_text("x\n")
    with pytest.raises(UsageError, match="a_file is not a directory"):
        common.new_run_directory(tmp_path / "a_file" / "out", "run")


@pytest.mark.parametrize("measured, errors, code", [
    (5, 0, common.EXIT_OK), (0, 0, common.EXIT_OK), (0, 3, common.EXIT_ALL_ERRORED),
    (4, 1, common.EXIT_SOME_ERRORED),
])
def test_exit_code_follows_error_rows(measured, errors, code):
    assert common.exit_code(measured, errors) == code


def test_a_subcommands_usage_error_is_one_line_named_for_it(capsys, tmp_path):
    assert commands.main(["report", str(tmp_path)]) == common.EXIT_USAGE
    error = capsys.readouterr().err
    assert error == f"run_bench.py report: error: {tmp_path}: no results.csv; give a run " \
                    "directory written by run_bench.py\n"
    assert commands.main(["report"]) == common.EXIT_USAGE
    assert capsys.readouterr().err.startswith("run_bench.py report: error: the following "
                                              "arguments are required")


def test_the_sweep_help_names_every_subcommand():
    text = " ".join(sweep.build_parser().format_help().split())
    for name in SUBCOMMANDS:
        assert f"{name}:" in text, name
    assert len(SUBCOMMANDS) >= 8


def test_no_command_imports_another_modules_private_name():
    wrong = []
    for path in sorted((REPO_ROOT / "bench" / "commands").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bench"):
                wrong += [f"{path.name}: {node.module}.{alias.name}" for alias in node.names
                          if alias.name.startswith("_")]
    assert wrong == []


# ---------------------------------------------------------------- first contact without torch

def _run_bench(python_arguments: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    # This checkout's packages, whatever else is installed.
    return subprocess.run([sys.executable, *python_arguments], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})


def _check_install_line(result: subprocess.CompletedProcess, names: tuple[str, ...]) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = result.stderr.strip("\n").split("\n")
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("run_bench.py: error: ")
    assert "python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 -e ." in lines[0]
    missing = lines[0].split("error: ")[1].split(" ")[0]
    assert missing in names, lines[0]
    return missing


def test_without_torch_run_bench_names_it_and_the_install_command(tmp_path):
    # torch blocked in the interpreter that runs run_bench.py as a script (None in sys.modules
    # makes `import torch` fail as an uninstalled module does).
    script = str(REPO_ROOT / "run_bench.py")
    blocked = ("import runpy, sys; sys.modules['torch'] = None; "
               f"sys.argv = [{script!r}]; runpy.run_path({script!r}, run_name='__main__')")
    result = _run_bench(["-c", blocked], tmp_path)
    assert _check_install_line(result, ("torch",)) == "torch"
    assert not list(tmp_path.iterdir())  # nothing written


def test_without_site_packages_run_bench_names_the_first_missing_dependency(tmp_path):
    # -S: none of the installed packages are importable, as on a machine before the install.
    result = _run_bench(["-S", str(REPO_ROOT / "run_bench.py"), "--list"], tmp_path)
    dependencies = runpy.run_path(str(REPO_ROOT / "run_bench.py"))["BASE_DEPENDENCIES"]
    _check_install_line(result, dependencies)
    assert not list(tmp_path.iterdir())
