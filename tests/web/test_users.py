"""The user service and `cxr-node user ...` commands."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from dicom_node import cli, users
from dicom_node.errors import AuthenticationError, ConflictError
from dicom_node.settings import load_settings
from dicom_node.store.db import make_engine, make_session_factory, session_scope
from dicom_node.store.models import AuditEvent, User, UserRole

pytestmark = [pytest.mark.db]


def _cli(
    config: Path, argv: list[str], stdin: str, monkeypatch: pytest.MonkeyPatch, *, after: bool = False
) -> int:
    """Run the subcommands through the node's CLI (its errors: one line, exit code 2)."""
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    return cli.main([*argv, "--config", str(config)] if after else ["--config", str(config), *argv])


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "node.yaml"
    path.write_text(f"node:\n  data_dir: {tmp_path / 'var'}\n")
    make_engine(f"sqlite:///{tmp_path / 'var' / 'cxr-node.sqlite3'}").dispose()  # the install step makes it
    return path


def test_user_add_and_list_from_the_cli(
    config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _cli(config, ["user", "list"], "", monkeypatch) == 0
    assert "create the first admin with: cxr-node user add" in capsys.readouterr().out
    code = _cli(
        config,
        ["user", "add", "--username", "root", "--role", "admin", "--password-stdin"],
        "s3cret-admin-pw\n",
        monkeypatch,
    )
    assert code == 0
    assert "created admin 'root'" in capsys.readouterr().out
    assert _cli(config, ["user", "list"], "", monkeypatch, after=True) == 0  # --config after the command
    listing = capsys.readouterr().out
    assert "root" in listing and "admin" in listing and "never" in listing
    assert "s3cret" not in listing
    settings = load_settings(config)
    factory = make_session_factory(make_engine(settings.database_url))
    with session_scope(factory) as s:
        user = s.scalars(select(User)).one()
        assert user.password_hash.startswith("$argon2id$") and "s3cret" not in user.password_hash
        users.authenticate(s, "root", "s3cret-admin-pw")
        event = s.scalars(select(AuditEvent).where(AuditEvent.action == "user.add")).one()
        assert event.actor.startswith("cli:") and "s3cret" not in str(event.details)


def test_a_user_command_without_the_nodes_database_stops_before_asking_for_a_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Run without the node's configuration, `user add` asked for the password twice and then said there
    was no database, with exit code 1 where every other command stops with 2 (review)."""
    elsewhere = tmp_path / "elsewhere.yaml"
    elsewhere.write_text(f"node:\n  data_dir: {tmp_path / 'no-node-here'}\n")
    for argv in (["user", "add", "--username", "rad", "--role", "radiologist", "--password-stdin"],
                 ["user", "passwd", "--username", "rad", "--password-stdin"], ["user", "list"]):
        assert _cli(elsewhere, argv, "long-enough-pw\n", monkeypatch) == 2
        error = capsys.readouterr().err
        assert error.startswith("error: no node database at ") and error.count("\n") == 1
        assert sys.stdin.read() == "long-enough-pw\n"  # the password was not read


def test_cli_refuses_short_passwords_and_duplicates(
    config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    add = ["user", "add", "--username", "rad", "--role", "radiologist", "--password-stdin"]
    assert _cli(config, add, "short\n", monkeypatch) == 2
    assert "at least 10 characters" in capsys.readouterr().err
    assert _cli(config, add, "long-enough-pw\n", monkeypatch) == 0
    assert _cli(config, add, "long-enough-pw\n", monkeypatch) == 2
    assert "exists already" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("password", "reason"),
    [
        (" " * 12, "at least 10 characters"),
        ("1234567890", "first that guessers try"),
        ("Password2024!", "first that guessers try"),
        ("qwertyuiop", "first that guessers try"),
        ("radiologist-1", "first that guessers try"),
        ("dr.house-1234", "must not be the username"),
        ("12345678901234", "first that guessers try"),
        ("1234567890!", "first that guessers try"),  # a counting run with a symbol added
        ("0987654321.", "first that guessers try"),
        ("dr.house2024!!", "must not be the username"),
        ("abababababab", "too few different characters"),
    ],
)
def test_passwords_guessers_try_first_are_refused(password: str, reason: str) -> None:
    """Only the length was checked: ten spaces, "1234567890" and the username itself were accepted
    (NIST SP 800-63B 5.1.1.2 asks for a check against common and context-specific words)."""
    with pytest.raises(users.InvalidUserError, match=reason):
        users.check_password(password, "Dr.House")
    users.check_password("correct horse battery staple", "Dr.House")  # a phrase is fine


@pytest.mark.parametrize(
    "password",
    ["Summer2024", "Winter2025", "monkey123456", "football2024", "dragon123456", "baseball123",
     "sunshine2024", "Princess2024", "P@ssw0rd2024", "1234567890a", "qazwsxedcrfv", "Radiologist2024"],
)
def test_passwords_a_cracker_guesses_early_are_refused(password: str) -> None:
    """A season and a year, a common word with digits, a keyboard walk, letters swapped for digits: a
    list of 14 passwords and 17 words let them all through (review)."""
    with pytest.raises(users.InvalidUserError, match="too easy to guess|first that guessers try"):
        users.check_password(password, "Dr.House")


@pytest.mark.parametrize(
    ("password", "username"),
    [
        ("seven brave lions at dawn", "eve"),  # a phrase that happens to hold a short name
        ("Lungenfell-Ahorn-42", "anna"),  # words of another language, joined
        ("mein hund heisst bello", "jan"),
        ("kV7#pQ2m9x", "li"),  # ten random characters
        ("tomorrow never comes", "tom"),
        ("Alice in Wonderland 1865", "alice"),
        ("830511427719", "rob"),  # random digits: long enough, no composition rules (NIST)
        ("4#9!7@2&8*1^", "rob"),
        ("xq7!zr9#ted", "ed"),  # a random string that happens to hold a short name
        ("k3v!nmark9q", "mark"),
    ],
)
def test_passphrases_and_random_strings_are_accepted(password: str, username: str) -> None:
    users.check_password(password, username)


def test_cli_disable_and_passwd(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _cli(
        config,
        ["user", "add", "--username", "a1", "--role", "admin", "--password-stdin"],
        "first-password\n",
        monkeypatch,
    )
    _cli(
        config,
        ["user", "add", "--username", "r1", "--role", "radiologist", "--password-stdin"],
        "first-password\n",
        monkeypatch,
    )
    assert _cli(config, ["user", "disable", "--username", "r1"], "", monkeypatch) == 0
    assert _cli(config, ["user", "disable", "--username", "a1"], "", monkeypatch) == 2  # last admin
    assert (
        _cli(
            config,
            ["user", "passwd", "--username", "a1", "--password-stdin"],
            "second-password\n",
            monkeypatch,
        )
        == 0
    )
    assert _cli(config, ["user", "disable", "--username", "nobody"], "", monkeypatch) == 2
    factory = make_session_factory(make_engine(load_settings(config).database_url))
    with session_scope(factory) as s:
        users.authenticate(s, "a1", "second-password")
        with pytest.raises(AuthenticationError):
            users.authenticate(s, "a1", "first-password")
        with pytest.raises(AuthenticationError):
            users.authenticate(s, "r1", "first-password")  # disabled


def test_authentication_does_not_reveal_which_part_was_wrong(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _cli(
        config,
        ["user", "add", "--username", "u1", "--role", "radiologist", "--password-stdin"],
        "amber-lung-window-7\n",
        monkeypatch,
    )
    factory = make_session_factory(make_engine(load_settings(config).database_url))
    with session_scope(factory) as s:
        messages = set()
        for name, password in (("u1", "wrong-password"), ("nobody", "amber-lung-window-7"), ("", "")):
            with pytest.raises(AuthenticationError) as info:
                users.authenticate(s, name, password)
            messages.add(str(info.value))
        assert messages == {"invalid username or password"}
        with pytest.raises(ConflictError):
            users.create_user(s, " u1 ", "another-password", UserRole.ADMIN, "test")


def test_user_add_without_a_terminal_or_a_password_says_how_to_give_one(
    config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`cxr-node user add` run by a script, with no terminal and standard input closed (`< /dev/null`, an
    installer without --password-stdin), died of an uncaught EOFError: a CRITICAL log record with a stack
    trace instead of one line saying how to give the password. An empty --password-stdin was refused as
    "at least 10 characters", as though a password had been typed."""

    def closed_stdin(prompt: str = "Password: ") -> str:
        raise EOFError  # what getpass raises without a terminal once standard input has ended

    monkeypatch.setattr(users.getpass, "getpass", closed_stdin)
    add = ["user", "add", "--username", "rad", "--role", "radiologist"]
    assert _cli(config, add, "", monkeypatch) == 2
    database, error = capsys.readouterr().err.splitlines()  # the database it uses, then the error
    assert database.startswith("database: ")
    assert error.startswith("error: no password given") and "--password-stdin" in error
    assert _cli(config, [*add, "--password-stdin"], "", monkeypatch) == 2
    database, error = capsys.readouterr().err.splitlines()
    assert error.startswith("error: no password given")
