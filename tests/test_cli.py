"""The command line's failures, through the real `copl` entry point in a subprocess: each is one line on
stderr and exit code 1, never a traceback, and leaves nothing half done. (A broken release on `copl eval`
needs a trained release: tests/test_end_to_end.py.)"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from copl_cli.main import DEMO_ENTRIES, DEMO_MARKER, _demo_workdir
from copl_common.registry import Registry
from tests.conftest import make_records, write_jsonl
from tests.test_registry import _publish

COPL = [sys.executable, "-m", "copl_cli.launcher"]   # what the `copl` script runs
UNREACHABLE = "postgresql://postgres:s3cret@127.0.0.1:1/none"


def copl(*args, home: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {"COPL_HOME": str(home), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*COPL, *args], capture_output=True, text=True, env=env, input=stdin, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.mark.parametrize("command", [["train", "--profile", "tiny"], ["ingest", "FILE"], ["stats"],
                                     ["db", "upgrade"], ["db", "downgrade", "base", "--yes"]])
def test_an_unreachable_database_is_one_line(command, tmp_path):
    command = [str(write_jsonl(tmp_path / "r.jsonl", make_records(3))) if a == "FILE" else a for a in command]
    proc = copl(*command, "--db", UNREACHABLE, home=tmp_path)
    line = assert_one_line_error(proc, "cannot use the preference store", "127.0.0.1:1", "Connection refused")
    assert "s3cret" not in line  # the password is not printed
    assert not (tmp_path / "registry").exists()  # train stopped before anything ran


def test_synth_beyond_the_prompt_grammar_is_one_line(tmp_path):
    proc = copl("synth", "--users", "300000", "--out", str(tmp_path / "out"), home=tmp_path)
    assert_one_line_error(proc, "prompt grammar", "at most 288,000 users")
    assert not (tmp_path / "out").exists()


def test_releases_list_shows_the_good_releases_and_names_the_bad_one(tmp_path):
    reg = Registry(tmp_path / "registry")
    good = [_publish(reg, "one").id, _publish(reg, "two").id]
    (reg.releases_dir / "20200101T000000Z-0badc0de").mkdir()  # a copy that never finished
    proc = copl("releases", "list", "--json", home=tmp_path)
    assert_one_line_error(proc, "20200101T000000Z-0badc0de", "no release.json")
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["id"] for r in rows] == good and [r["current"] for r in rows] == [False, True]


def test_demo_refuses_a_directory_it_did_not_make_and_touches_nothing(tmp_path):
    checkout = tmp_path / "checkout"
    (checkout / "src").mkdir(parents=True)
    (checkout / "src" / "main.py").write_text("print('mine')\n")
    (checkout / "copl.db").write_text("not the demo's")
    before = sorted(p.relative_to(checkout) for p in checkout.rglob("*"))
    proc = copl("demo", "--workdir", str(checkout), home=tmp_path)
    assert_one_line_error(proc, "not made by `copl demo`", "nothing was deleted")
    assert sorted(p.relative_to(checkout) for p in checkout.rglob("*")) == before
    assert (checkout / "copl.db").read_text() == "not the demo's"


def test_demo_cleans_only_its_own_entries_of_an_earlier_demo(tmp_path):
    new = tmp_path / "new"
    _demo_workdir(new)                        # a new directory: made and marked
    assert [p.name for p in new.iterdir()] == [DEMO_MARKER]
    for name in DEMO_ENTRIES:                 # what an earlier demo left
        if name in ("dataset", "registry"):
            (new / name / "sub").mkdir(parents=True)
            (new / name / "sub" / "f").write_text("x")
        else:
            (new / name).write_text("x")
    (new / "my-notes.txt").write_text("keep me")
    _demo_workdir(new)
    assert sorted(p.name for p in new.iterdir()) == sorted([DEMO_MARKER, "my-notes.txt"])
    _demo_workdir(tmp_path / "empty-but-existing")  # an empty directory is fine too
    empty = tmp_path / "empty"
    empty.mkdir()
    _demo_workdir(empty)
    assert (empty / DEMO_MARKER).is_file()


def test_db_downgrade_and_upgrade(tmp_path):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    path = write_jsonl(tmp_path / "r.jsonl", make_records(3))
    assert copl("ingest", str(path), "--db", url, "--no-progress", home=tmp_path).returncode == 0

    def tables():
        engine = sa.create_engine(url)
        try:
            return set(sa.inspect(engine).get_table_names())
        finally:
            engine.dispose()

    # without --yes and nobody to answer: refused, nothing changed
    assert_one_line_error(copl("db", "downgrade", "base", "--db", url, home=tmp_path, stdin=""), "not confirmed")
    assert "preferences" in tables()
    assert_one_line_error(copl("db", "downgrade", "nope", "--db", url, "--yes", home=tmp_path),
                          "cannot migrate to 'nope'")
    proc = copl("db", "downgrade", "base", "--db", url, "--yes", home=tmp_path)
    assert proc.returncode == 0 and "schema at revision base" in proc.stdout, proc.stderr
    assert tables() <= {"alembic_version"}
    proc = copl("db", "upgrade", "--db", url, home=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "schema at revision 0002", proc.stderr
    assert {"users", "prompts", "responses", "preferences"} <= tables()


def test_an_unexpected_failure_is_still_one_line(monkeypatch, capsys):
    import copl_cli.main as cli

    def broken(**_):
        raise RuntimeError("something no command expected\nsecond line")

    monkeypatch.setattr(cli, "app", broken)
    monkeypatch.delenv("COPL_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: unexpected RuntimeError: something no command expected second line "
                   "(COPL_DEBUG=1 shows the traceback)"]
    monkeypatch.setenv("COPL_DEBUG", "1")
    with pytest.raises(RuntimeError):
        cli.main()


def test_the_launcher_names_the_server_extra_when_it_is_missing(monkeypatch, capsys):
    from copl_cli import launcher
    monkeypatch.setattr(launcher, "SERVER_MODULES", ("typer", "no_such_module_anywhere"))
    with pytest.raises(SystemExit) as exit_info:
        launcher.main()
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.splitlines() == [
        "error: the copl command line needs the server extra (missing: no_such_module_anywhere); "
        "install it with: pip install 'copl[server]'"]


def test_synth_styles_family_and_a_bad_family(tmp_path):
    proc = copl("synth", "--family", "styles", "--users", "60", "--pairs", "4", "--types", "4", "--one-attribute",
                "--out", str(tmp_path / "styles"), home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "styles" / "dataset.json").read_text())
    assert summary["settings"]["pairs_per_user"] == 4 and not summary["settings"]["mixed"]
    assert json.loads(proc.stdout)["train_seen"] + json.loads(proc.stdout)["train_unseen"] == 60 * 4
    assert_one_line_error(copl("synth", "--family", "nope", "--out", str(tmp_path / "x"), home=tmp_path),
                          "family must be uf-p or styles")
