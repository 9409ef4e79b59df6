"""Console users: argon2 password hashes, roles, and the `cxr-node user ...` commands.

There is no default account and no default password: the operator creates the first admin with
``cxr-node user add --username NAME --role admin`` and types the password at a prompt.
"""

from __future__ import annotations

import argparse
import functools
import getpass
import logging
import re
import sys
import unicodedata
from collections.abc import Callable
from datetime import UTC, datetime

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, sessionmaker
from zxcvbn import zxcvbn

from dicom_node import audit
from dicom_node.errors import AuthenticationError, ConflictError, NodeError, NotFoundError
from dicom_node.store.models import User, UserRole, WebSession
from dicom_node.terminal import say

LOGGER = logging.getLogger(__name__)

MIN_PASSWORD_LENGTH = 10
MAX_PASSWORD_LENGTH = 1024
USERNAME_MAX = 64
CREATE_ADMIN_HINT = "cxr-node user add --username <name> --role admin"

_HASHER = PasswordHasher()  # argon2id with the library's current recommended parameters


@functools.cache
def _dummy_hash(hasher: PasswordHasher) -> str:
    """Verifying against this keeps a failed login for an unknown user as slow as for a known one (made on
    first use, not at import: a hash costs what a login costs)."""
    return hasher.hash("not-a-password-of-anyone")


class InvalidUserError(NodeError):
    """A username or password that the console will not accept."""


#: Passwords of at least 10 characters that lists of breached passwords put near the top, and words a
#: guesser tries first here (NIST SP 800-63B 5.1.1.2: check against commonly used and context words).
_COMMON_PASSWORDS = frozenset({
    "1234567890", "0987654321", "1q2w3e4r5t", "1qaz2wsx3edc", "qwertyuiop", "asdfghjkl;", "zxcvbnm,./",
    "qwerty1234", "1234qwer", "abcd123456", "a1b2c3d4e5", "123456789a", "iloveyou12", "princess12",
})
#: Words that, with digits or symbols around them, make a password guessed early.
_GUESSED_WORDS = frozenset({
    "password", "passwort", "passw0rd", "qwerty", "letmein", "welcome", "changeme", "admin", "administrator",
    "radiology", "radiologist", "hospital", "cxrnode", "cxr-node", "iloveyou", "secret", "default",
})
_SYMBOLS = " !@#$%^&*()-_=+.,;:?'\"/\\|[]{}<>~`"
_AROUND = "0123456789" + _SYMBOLS
#: Letters a password must have besides the username for the name not to be its substance.
_MIN_OTHER_LETTERS = 4


def _is_digit_run(password: str) -> bool:
    """Counting up or down ("1234567890123", "9876543210")."""
    return password.isdigit() and (password in "0123456789" * 4 or password in "9876543210" * 4)


#: Fewer different characters than this is a pattern ("aaaaaaaaaa", "abababab12"), not a password.
_MIN_DISTINCT_CHARACTERS = 5


def hash_password(password: str, username: str = "") -> str:
    check_password(password, username)
    return _HASHER.hash(password)


def _bad_password(message: str) -> InvalidUserError:
    return InvalidUserError(message, field="password")


def check_password(password: str, username: str = "") -> None:
    """Length, then what a guesser tries first: a common password, a common word with digits or symbols
    around it, the account's own name, a run of few different characters. No composition rules (NIST
    SP 800-63B): a long phrase is the better password."""
    if len(password.strip()) < MIN_PASSWORD_LENGTH:
        raise _bad_password(f"password must have at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise _bad_password(f"password must have at most {MAX_PASSWORD_LENGTH} characters")
    lowered = password.lower()
    core = lowered.strip(_AROUND)
    if lowered in _COMMON_PASSWORDS or core in _GUESSED_WORDS or _is_digit_run(lowered.strip(_SYMBOLS)):
        raise _bad_password("password is one of the first that guessers try; choose a longer phrase")
    name = username.strip().lower()
    # The name with digits or symbols added is guessed early; a phrase or a random string that happens to
    # hold a short name ("tomorrow never comes" for tom, "xq7!zr9#ted" for ed) is not.
    others = sum(1 for c in lowered.replace(name, "") if c.isalpha()) if name else 0
    if name and (core == name or (name in lowered and others < _MIN_OTHER_LETTERS)):
        raise _bad_password("password must not be the username with a few characters added")
    if len(set(lowered)) < _MIN_DISTINCT_CHARACTERS:
        raise _bad_password("password has too few different characters; choose a longer phrase")
    _check_guessable(password, name)


#: zxcvbn's scale: 3 means about 10^8 guesses or more (a season and a year, a word and digits, a keyboard
#: walk or a common password with a symbol swapped in all score lower); it reads at most 72 characters.
_MIN_STRENGTH = 3
_STRENGTH_MAX_LENGTH = 72


def _check_guessable(password: str, name: str) -> None:
    """How many guesses a password cracker needs, by zxcvbn (Wheeler, USENIX Security 2016): common
    passwords, dictionary words in several languages, names, dates, years, keyboard patterns, repeats and
    letters swapped for look-alike digits, with this node's own words and the username as context."""
    context = [*_GUESSED_WORDS, name] if name else list(_GUESSED_WORDS)
    result = zxcvbn(password[:_STRENGTH_MAX_LENGTH], user_inputs=context)
    if int(result["score"]) < _MIN_STRENGTH:
        warning = str(result["feedback"].get("warning") or "").rstrip(".")
        because = f" ({warning.lower()})" if warning else ""
        raise _bad_password(f"password is too easy to guess{because}; choose a longer phrase")


#: A new username: ASCII letters, digits and ". _ - @" (login names as directories issue them). Letters of
#: other scripts are refused so that no two accounts look alike ("bob" and "bоb" with a Cyrillic o).
_USERNAME = re.compile(r"[A-Za-z0-9._@-]+")


def _check_username(username: str) -> str:
    name = username.strip()
    if not 1 <= len(name) <= USERNAME_MAX or not _USERNAME.fullmatch(name):
        raise InvalidUserError(
            f"username must be 1-{USERNAME_MAX} characters: letters A-Z, digits and . _ - @ (no spaces)",
            field="username",
        )
    return name


def list_users(session: Session) -> list[User]:
    return list(session.scalars(select(User).order_by(User.username)))


def find(session: Session, username: str) -> User | None:
    """The user with this name, whatever its letter case ("Alice" logs in as alice). Names are unique
    without regard to case since they are checked so; of accounts made before that and differing only in
    case, the exact spelling is found, and a spelling that is neither is found by none."""
    name = username.strip()
    exact = session.scalar(select(User).where(User.username == name))
    if exact is not None:
        return exact
    folded = list(session.scalars(select(User).where(func.lower(User.username) == name.lower()).limit(2)))
    return folded[0] if len(folded) == 1 else None


def account_name(session: Session, username: str) -> str:
    """What failed logins for a typed name count against: the account's own name when it exists, else
    the name in lower case, so that "BOB" and "bob" are one account and one count."""
    user = find(session, username) if username.strip() else None
    return user.username if user is not None else unicodedata.normalize("NFKC", username.strip()).casefold()


def get_by_name(session: Session, username: str) -> User:
    user = find(session, username)
    if user is None:
        raise NotFoundError(f"no user named {username!r}")
    return user


def get_by_id(session: Session, user_id: int) -> User:
    user = session.get(User, user_id)
    if user is None:
        raise NotFoundError(f"no user with id {user_id}")
    return user


def admin_exists(session: Session) -> bool:
    """Whether an active admin exists (otherwise nobody can administer the node)."""
    count = session.scalar(
        select(func.count()).select_from(User).where(User.role == UserRole.ADMIN, User.active.is_(True))
    )
    return bool(count)


def create_user(session: Session, username: str, password: str, role: UserRole, actor: str) -> User:
    name = _check_username(username)
    # in any letter case: the same name exactly is among them
    if session.scalar(select(User.id).where(func.lower(User.username) == name.lower()).limit(1)) is not None:
        raise ConflictError(f"a user named {name!r} exists already (letter case does not make a new name)",
                            field="username")
    user = User(username=name, password_hash=hash_password(password, name), role=role, active=True)
    session.add(user)
    session.flush()
    audit.record(session, actor, "user.add", f"app_user:{user.id}", {"username": name, "role": role.value})
    return user


def set_password(session: Session, user_id: int, password: str, actor: str) -> User:
    """Replace a password and end the user's sessions (a reset must lock out whoever knew the old one)."""
    user = get_by_id(session, user_id)
    user.password_hash = hash_password(password, user.username)
    session.execute(delete(WebSession).where(WebSession.user_pk == user.id))
    session.flush()
    audit.record(session, actor, "user.set_password", f"app_user:{user.id}", {"username": user.username})
    return user


def set_active(session: Session, user_id: int, active: bool, actor: str) -> User:
    """Enable or disable a user. Disabling ends the user's sessions; the last active admin stays."""
    user = get_by_id(session, user_id)
    if user.active == active:
        return user
    if not active and user.role is UserRole.ADMIN:
        # The active admins' rows locked, this one's too, until the commit: two admins disabling each other
        # at once each counted the other as the one who remains, and on PostgreSQL both went through
        # (review). The second now waits for the first and finds itself the last.
        admins = session.scalars(
            select(User.id).where(User.role == UserRole.ADMIN, User.active.is_(True)).with_for_update()
        ).all()
        if not any(pk != user.id for pk in admins):
            raise ConflictError("the last active admin cannot be disabled")
    user.active = active
    if not active:
        session.execute(delete(WebSession).where(WebSession.user_pk == user.id))
    session.flush()
    action = "user.enable" if active else "user.disable"
    audit.record(session, actor, action, f"app_user:{user.id}", {"username": user.username})
    return user


def authenticate(session: Session, username: str, password: str) -> User:
    """Return the active user with these credentials or raise :class:`AuthenticationError`.

    The message never says whether the name or the password was wrong.

    The session's transaction ends (commits) before the hash is checked, which is slow on purpose: on
    SQLite every transaction holds the node's one write lock, and each login attempt, anyone's, held it
    for a hash check, so that images being received waited behind password guessing (review). The user is
    read again after the check: an admin may have disabled them or set a new password meanwhile.
    """
    user = find(session, username) if username.strip() else None
    stored_hash = user.password_hash if user is not None else None
    session.commit()
    try:
        _HASHER.verify(stored_hash or _dummy_hash(_HASHER), password)
    except (VerifyMismatchError, VerificationError, InvalidHashError) as exc:
        raise AuthenticationError("invalid username or password") from exc
    if user is None or stored_hash is None:
        raise AuthenticationError("invalid username or password")
    rehashed = _HASHER.hash(password) if _HASHER.check_needs_rehash(stored_hash) else None
    session.refresh(user)
    if not user.active or user.password_hash != stored_hash:
        raise AuthenticationError("invalid username or password")
    if rehashed is not None:
        user.password_hash = rehashed
    user.last_login_at = datetime.now(UTC)
    return user


# -------------------------------------------------------------------------------------------------
# CLI: cxr-node user add | list | disable | enable | passwd
# -------------------------------------------------------------------------------------------------


def register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``user`` with its subcommands to the ``cxr-node`` CLI."""
    parser = subparsers.add_parser("user", help="console users (admins and radiologists)")
    commands = parser.add_subparsers(dest="user_command", required=True)

    add = commands.add_parser("add", help="create a user; the password is read from a prompt or stdin")
    add.add_argument("--username", required=True)
    add.add_argument("--role", required=True, choices=[r.value for r in UserRole])
    add.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    add.set_defaults(func=_cli_add)
    _config_option(add)

    lst = commands.add_parser("list", help="list users")
    lst.set_defaults(func=_cli_list)
    _config_option(lst)

    for name, active in (("disable", False), ("enable", True)):
        sub = commands.add_parser(name, help=f"{name} a user")
        sub.add_argument("--username", required=True)
        sub.set_defaults(func=_cli_set_active(active))
        _config_option(sub)

    passwd = commands.add_parser("passwd", help="set a user's password (ends the user's sessions)")
    passwd.add_argument("--username", required=True)
    passwd.add_argument("--password-stdin", action="store_true")
    passwd.set_defaults(func=_cli_passwd)
    _config_option(passwd)


def _config_option(parser: argparse.ArgumentParser) -> None:
    """``--config`` after the subcommand too; SUPPRESS keeps one given before it."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="YAML settings file (default: $CXR_NODE_CONFIG)",
    )


def _session_factory(args: argparse.Namespace) -> sessionmaker[Session]:
    from dicom_node.logconfig import configure_logging, for_command
    from dicom_node.settings import load_settings
    from dicom_node.store.parts import command_sessions

    settings = load_settings(getattr(args, "config", None))
    configure_logging(for_command(settings.logging))
    return command_sessions(settings)


def _read_password(args: argparse.Namespace) -> str:
    """The password from standard input (``--password-stdin``) or typed twice at the terminal. Standard
    input that ends first (a script's ``< /dev/null``, no terminal) is one line saying how to give it: it
    was an uncaught EOFError, or "at least 10 characters" for a password never given (review)."""
    if args.password_stdin:
        line = sys.stdin.readline()
        if not line:
            raise InvalidUserError("no password given: standard input ended before a line was read "
                                   "(--password-stdin reads the password's line from it)")
        return line.rstrip("\r\n")
    try:
        first = getpass.getpass("Password: ")
        repeat = getpass.getpass("Repeat password: ")
    except EOFError:
        raise InvalidUserError("no password given: standard input ended at the prompt; run the command in "
                               "a terminal, or give the password on standard input with --password-stdin"
                               ) from None
    if repeat != first:
        raise InvalidUserError("the passwords do not match")
    return first


# The commands open the node's database before asking for a password (a command run without the node's
# configuration stops at once, not after the prompts), and leave errors to the node CLI's main: one line
# `error: ...`, exit code 2, as every other command (they exited 1: review).


def _sessions_and_new_password(args: argparse.Namespace) -> tuple[sessionmaker[Session], str]:
    """The node's database, opened first, then a password for ``args.username`` read and checked."""
    sessions = _session_factory(args)
    password = _read_password(args)
    check_password(password, args.username)
    return sessions, password


def _cli_add(args: argparse.Namespace) -> int:
    from dicom_node.store.db import session_scope

    sessions, password = _sessions_and_new_password(args)
    with session_scope(sessions) as session:
        user = create_user(session, args.username, password, UserRole(args.role), audit.cli_actor())
        say(f"created {user.role.value} {user.username!r}")
    return 0


def _cli_list(args: argparse.Namespace) -> int:
    from dicom_node.store.db import session_scope

    with session_scope(_session_factory(args)) as session:
        users = list_users(session)
        if not users:
            say(f"no users; create the first admin with: {CREATE_ADMIN_HINT}")
        for user in users:
            last = user.last_login_at.strftime("%Y-%m-%d %H:%M") if user.last_login_at else "never"
            state = "active" if user.active else "disabled"
            say(f"{user.username:<24} {user.role.value:<12} {state:<9} last login {last}")
    return 0


def _cli_set_active(active: bool) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        from dicom_node.store.db import session_scope

        with session_scope(_session_factory(args)) as session:
            user = get_by_name(session, args.username)
            set_active(session, user.id, active, audit.cli_actor())
            say(f"{'enabled' if active else 'disabled'} {user.username!r}")
        return 0

    return command


def _cli_passwd(args: argparse.Namespace) -> int:
    from dicom_node.store.db import session_scope

    sessions, password = _sessions_and_new_password(args)
    with session_scope(sessions) as session:
        user = get_by_name(session, args.username)
        set_password(session, user.id, password, audit.cli_actor())
        say(f"password set for {user.username!r}")
    return 0
