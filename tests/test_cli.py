"""The command line: every failure is one line that names the fix (exit 2), Ctrl-C says how to resume."""

from __future__ import annotations

import pytest

from steering import cli


def run(capsys, *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.err


def test_a_missing_model_folder_is_one_line(capsys):
    code, err = run(capsys, "info", "--model", "/nonexistent/model-folder")
    assert code == 2
    assert err.startswith("error: model folder /nonexistent/model-folder does not exist")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_store_that_is_not_sqlite_is_one_line(capsys, tmp_path):
    bogus = tmp_path / "results.sqlite"
    bogus.write_text("this is not a database")
    code, err = run(capsys, "report", str(bogus))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: cannot open result store {bogus}: file is not a database")


@pytest.mark.parametrize("exc", [TypeError("bad operand"), OSError("disk on fire"), RuntimeError("boom")])
def test_any_exception_is_one_line_and_verbose_shows_the_traceback(capsys, monkeypatch, exc):
    def fail(args):
        raise exc

    monkeypatch.setattr(cli.info, "execute", fail)
    code, err = run(capsys, "info")
    assert code == 2
    assert err == f"error: {exc} ({type(exc).__name__}; rerun with -v for the traceback)\n"
    with pytest.raises(type(exc)):
        cli.main(["-v", "info"])


def test_ctrl_c_exits_cleanly_and_says_how_to_resume(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.run, "execute", interrupted)
    code, err = run(capsys, "run", "quickstart")
    assert code == 130
    assert err == "interrupted; rerun the same command to resume (finished rows are kept)\n"


def test_every_command_is_registered_explicitly():
    parser = cli.build_parser()
    names = set(parser._subparsers._group_actions[0].choices)
    assert names == {"demo", "fetch", "info", "extract", "vectors", "gap", "sweep", "run", "report", "layers"}
    assert {c.NAME for c in cli.COMMANDS} == names


def test_gap_refuses_a_key_over_plain_http_to_another_machine(capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    argv = ["gap", "--scorer", "judge", "--judge", "endpoint", "--judge-url", "http://judge.example.com/v1"]
    code, err = run(capsys, *argv, "--n", "1", "--judge-timeout", "1", "--judge-retries", "0")
    assert code == 2 and "http://" in err and "allow" in err and len(err.strip().splitlines()) == 1
