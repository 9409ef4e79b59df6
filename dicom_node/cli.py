"""``cxr-node`` command line: serve, database, AE administration (audited), echo and send.

Other packages add subcommands through ``register(subparsers)`` functions; a missing optional package
does not break the CLI.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from classifier.cli import INTERRUPTED
from classifier.errors import ClassifierError
from dicom_node import __version__, aes, audit
from dicom_node.errors import ConflictError, InvalidDatasetError, NodeError, NotFoundError
from dicom_node.logconfig import configure_logging, for_command
from dicom_node.settings import LoggingSettings, Settings, checked_ae_title, load_settings
from dicom_node.statuses import Status, is_stored
from dicom_node.store import db
from dicom_node.store.models import AeRole
from dicom_node.store.parts import command_sessions
from dicom_node.terminal import say

LOGGER = logging.getLogger(__name__)

# (module, function) pairs that add subcommands when their package is present.
PLUGINS: tuple[tuple[str, str], ...] = (
    ("classifier.cli", "register"),
    ("dicom_node.users", "register_cli"),
    ("dicom_node.outbox", "register"),
)


def _settings(args: argparse.Namespace, *, service: bool = False) -> Settings:
    settings = load_settings(args.config)
    configure_logging(settings.logging if service else for_command(settings.logging))
    return settings


def _session_factory(settings: Settings) -> Any:
    return command_sessions(settings)


# serve / db ----------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from dicom_node.app import build_node

    settings = _settings(args, service=True)
    node = build_node(settings)

    def announce(started: Any) -> None:
        web = f", console http://{settings.web.host}:{started.web.port}" if started.web is not None else ""
        say(f"cxr-node {__version__} listening: AE title {settings.dicom.ae_title}, "
            f"port {started.dicom_port} on {settings.dicom.bind_address}{web}; "
            f"database {db.describe_url(started.engine.url)}")

    node.serve_forever(on_started=announce)
    return 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    settings = _settings(args)
    engine = db.make_engine(settings.database_url)
    try:
        done = db.upgrade(engine)
    finally:
        engine.dispose()
    say(done.summary())
    return 0


# storage ------------------------------------------------------------------------------------


def cmd_storage_check(args: argparse.Namespace) -> int:
    from dicom_node import storage

    settings = _settings(args)
    factory = _session_factory(settings)
    try:
        return storage.command(args, settings, factory)
    finally:
        factory.kw["bind"].dispose()


# ae ------------------------------------------------------------------------------------------


def cmd_ae_add(args: argparse.Namespace) -> int:
    settings = _settings(args)
    role = AeRole(args.role)
    spec = aes.AeSpec(args.aet, role, args.host, args.port, args.tls, args.description or "", args.reply_to,
                      storage_commitment=args.storage_commitment)
    with _session_factory(settings)() as session, session.begin():
        ae = aes.add(session, spec, audit.cli_actor())
        say(f"added {role.value} {ae.ae_title} (id {ae.id})")
    if role is AeRole.CALLER and not args.reply_to and not settings.pipeline.fixed_destinations:
        say(f"warning: results of studies from {ae.ae_title} go nowhere: it has no --reply-to and "
            "pipeline.fixed_destinations is empty (they are still analysed and shown in the console)",
            err=True)
    return 0


def cmd_ae_list(args: argparse.Namespace) -> int:
    settings = _settings(args)
    role = AeRole(args.role) if args.role else None
    with _session_factory(settings)() as session:
        rows = aes.list_aes(session, role)
        say(f"{'ROLE':<12}{'AE TITLE':<18}{'HOST':<24}{'PORT':<7}{'TLS':<5}{'COMMIT':<8}{'ENABLED':<9}"
            "REPLY TO")
        for ae in rows:
            say(f"{ae.role.value:<12}{ae.ae_title:<18}{ae.host or '-':<24}{ae.port or '-'!s:<7}"
                  f"{'yes' if ae.tls else 'no':<5}{'yes' if ae.storage_commitment else 'no':<8}"
                  f"{'yes' if ae.enabled else 'no':<9}{ae.reply_to.ae_title if ae.reply_to else '-'}")
    return 0


def _one_ae(session: Any, name: str, role: str | None) -> Any:
    roles = [AeRole(role)] if role else list(AeRole)
    found = [ae for r in roles if (ae := aes.find(session, name, r)) is not None]
    if not found:
        raise NotFoundError(f"no AE titled {name!r}")
    if len(found) > 1:
        raise ConflictError(f"{name!r} is both a caller and a destination: add --role")
    return found[0]


def cmd_ae_remove(args: argparse.Namespace) -> int:
    settings = _settings(args)
    with _session_factory(settings)() as session, session.begin():
        ae = _one_ae(session, args.name, args.role)
        role = ae.role
        aes.remove(session, ae.id, audit.cli_actor())
    say(f"removed {role.value} {args.name}")  # once committed
    return 0


def cmd_ae_echo(args: argparse.Namespace) -> int:
    from dicom_node import scu
    from dicom_node.tls import client_context

    settings = _settings(args)
    with _session_factory(settings)() as session, session.begin():
        ae = aes.get(session, args.name, AeRole.DESTINATION)
        host, port, tls, title = ae.host or "", int(ae.port or 0), ae.tls, ae.ae_title
        audit.record(session, audit.cli_actor(), "ae.echo", f"remote_ae:{ae.id}", {})
    context = client_context(settings.dicom.tls) if tls else None
    status = scu.echo(host, port, title, calling_aet=settings.dicom.ae_title, tls=context)
    say(f"C-ECHO {title} at {host}:{port}: status 0x{status:04X}")
    return 0 if status == Status.SUCCESS else 1


# echo / send ---------------------------------------------------------------------------------


def cmd_echo(args: argparse.Namespace) -> int:
    from dicom_node import scu
    from dicom_node.tls import client_context

    settings = _settings(args)
    calling = args.calling_aet or settings.dicom.ae_title
    # as to a destination marked tls: a TLS peer (the node's own listener on TLS, a new PACS before it is
    # added) could not be called from here at all
    context = client_context(settings.dicom.tls) if args.tls else None
    status = scu.echo(args.host, args.port, args.aet, calling_aet=calling, tls=context)
    say(f"C-ECHO {args.aet} at {args.host}:{args.port}{' (TLS)' if args.tls else ''}: status 0x{status:04X}")
    return 0 if status == Status.SUCCESS else 1


def cmd_send(args: argparse.Namespace) -> int:
    from dicom_node import scu
    from dicom_node.tls import client_context

    settings = _settings(args)
    datasets = scu.load_datasets([Path(p) for p in args.paths])
    if not datasets:  # "sent 0 of 0 objects" after an empty association said nothing of why
        raise InvalidDatasetError("no DICOM file in the paths given: nothing sent")
    with _session_factory(settings)() as session, session.begin():
        ae = aes.get(session, args.to, AeRole.DESTINATION)
        host, port, tls, title = ae.host or "", int(ae.port or 0), ae.tls, ae.ae_title
        audit.record(session, audit.cli_actor(), "send", f"remote_ae:{ae.id}",
                     {"paths": len(args.paths)})
    context = client_context(settings.dicom.tls) if tls else None
    # the node's own limits, as its outbox sends with them: a slow archive's answer was awaited a fixed 60 s
    statuses = scu.send(datasets, host, port, title, calling_aet=settings.dicom.ae_title, tls=context,
                        max_pdu=settings.dicom.max_pdu, dimse_timeout=settings.dicom.dimse_timeout)
    stored = sum(1 for s in statuses if is_stored(s))
    for index, (ds, status) in enumerate(zip(datasets, statuses, strict=False)):
        if not is_stored(status):  # the file as the operator named it (or found in a folder they named)
            say(f"{getattr(ds, 'filename', None) or f'object {index + 1}'}: {scu.describe(status)}")
    say(f"sent {stored} of {len(statuses)} objects to {title} at {host}:{port}")
    return 0 if statuses and stored == len(statuses) else 1


# parser --------------------------------------------------------------------------------------


def _port(text: str) -> int:
    """A TCP port argument: out of range, the association thread died of an OverflowError (review)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 1-65535, not {port}")
    return port


def _ae_title(text: str) -> str:
    """An AE title argument: one DICOM does not allow stopped the command with pynetdicom's traceback."""
    try:
        return checked_ae_title(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None


def _host(text: str) -> str:
    """A host argument: a malformed name (``pacs..local``) ended in a UnicodeError's traceback."""
    if not aes.valid_host(text.strip()):
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address or a host name")
    return text.strip()


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="YAML settings file (default: $CXR_NODE_CONFIG, else built-in defaults)")
    parser = argparse.ArgumentParser(prog="cxr-node", parents=[common],
                                     description="DICOM node classifying chest radiographs")
    parser.add_argument("--version", action="version", version=f"cxr-node {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", parents=[common], help="run the node (DICOM listener, timers, console)")
    serve.set_defaults(func=cmd_serve)

    dbp = sub.add_parser("db", parents=[common], help="database administration")
    dbsub = dbp.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    dbsub.add_parser("upgrade", parents=[common], help="apply schema migrations").set_defaults(
        func=cmd_db_upgrade)

    stp = sub.add_parser("storage", parents=[common], help="the node's files against its database")
    stsub = stp.add_subparsers(dest="storage_command", required=True, metavar="ACTION")
    stc = stsub.add_parser(
        "check", parents=[common], help="list rows whose files are missing and files no row names",
        description="Compare the database with the files under the storage and results directories (run it "
        "after a restore). Exit code 0: they agree; 1: files are missing or damaged, or orphans are left; "
        "2: error.",
    )
    stc.add_argument("--remove-orphans", action="store_true",
                     help="delete the files no row names (audited; stop the node first)")
    stc.add_argument("--verify", action="store_true",
                     help="also read every file and compare it with the SHA-256 the node recorded when it "
                     "wrote it (finds files a disk damaged; reads all the stored data: slow)")
    stc.set_defaults(func=cmd_storage_check)

    aep = sub.add_parser("ae", parents=[common], help="allowed callers and result destinations (audited)")
    aesub = aep.add_subparsers(dest="ae_command", required=True, metavar="ACTION")
    add = aesub.add_parser("add", parents=[common], help="add a caller or a destination")
    add.add_argument("--role", required=True, choices=[r.value for r in AeRole])
    add.add_argument("--aet", required=True, help="AE title")
    add.add_argument("--host", help="callers: only accept from this host/IP; destinations: address")
    add.add_argument("--port", type=int, help="destinations: port")
    add.add_argument("--tls", action="store_true", help="destinations: use DICOM TLS")
    add.add_argument("--storage-commitment", action="store_true",
                     help="destinations: ask it to commit to keeping the results it was sent (N-ACTION), and "
                          "accept its reports (N-EVENT-REPORT) on associations it opens to the node")
    add.add_argument("--reply-to", help="callers: destination AE title that gets this caller's results")
    add.add_argument("--description", help="free text shown in listings")
    add.set_defaults(func=cmd_ae_add)
    lst = aesub.add_parser("list", parents=[common], help="list AEs")
    lst.add_argument("--role", choices=[r.value for r in AeRole])
    lst.set_defaults(func=cmd_ae_list)
    rem = aesub.add_parser("remove", parents=[common], help="remove an AE")
    rem.add_argument("name")
    rem.add_argument("--role", choices=[r.value for r in AeRole])
    rem.set_defaults(func=cmd_ae_remove)
    aecho = aesub.add_parser("echo", parents=[common], help="C-ECHO a configured destination")
    aecho.add_argument("name")
    aecho.set_defaults(func=cmd_ae_echo)

    echo = sub.add_parser("echo", parents=[common], help="C-ECHO any DICOM peer")
    echo.add_argument("host", type=_host)
    echo.add_argument("port", type=_port)
    echo.add_argument("aet", type=_ae_title, help="the peer's (called) AE title")
    echo.add_argument("--calling-aet", type=_ae_title, help="our AE title (default: dicom.ae_title)")
    echo.add_argument("--tls", action="store_true",
                      help="use DICOM TLS with dicom.tls's certificate, key and CA bundle")
    echo.set_defaults(func=cmd_echo)

    send = sub.add_parser("send", parents=[common], help="C-STORE files or folders to a destination")
    send.add_argument("paths", nargs="+", metavar="PATH")
    send.add_argument("--to", required=True, metavar="NAME", help="destination AE title")
    send.set_defaults(func=cmd_send)

    for module_name, function_name in PLUGINS:
        _register_plugin(sub, module_name, function_name)
    return parser


def _register_plugin(sub: Any, module_name: str, function_name: str) -> None:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            return  # package not installed/written yet
        raise
    register: Callable[[Any], None] | None = getattr(module, function_name, None)
    if register is not None:
        register(sub)


def main(argv: Sequence[str] | None = None) -> int:
    # TensorFlow's C++ start-up banner (oneDNN, CPU features) is noise in an operator's log.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "config"):
        args.config = None
    # Commands without node settings (train, evaluate, ensemble …) log with the defaults; commands that
    # read settings reconfigure from them.
    configure_logging(LoggingSettings())
    try:
        result = args.func(args)
        return int(result or 0)
    except (NodeError, ClassifierError) as exc:  # train/evaluate/classify raise the classifier's own
        say(f"error: {exc}", err=True)
        return 2
    except KeyboardInterrupt:  # Ctrl-C in train or evaluate (serve stops on SIGINT by itself)
        say(INTERRUPTED, err=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
