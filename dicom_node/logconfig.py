"""Logging, configured once by each entry point.

Service code logs row ids and UIDs-free summaries only; this module makes sure third-party loggers that
could print datasets (pynetdicom at DEBUG dumps DIMSE messages) stay quiet unless asked for.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import ssl
import sys
import threading
from datetime import UTC, datetime
from types import TracebackType
from typing import TextIO

from dicom_node.settings import LoggingSettings

# Libraries whose INFO/DEBUG output is noisy or may carry identifiers; kept at WARNING unless DEBUG.
QUIET_LOGGERS = (
    "pynetdicom", "apscheduler", "sqlalchemy.engine", "alembic", "PIL", "uvicorn.access", "pydicom", "highdicom",
)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "thread": record.threadName,
            "message": record.getMessage(),
        }
        if record.exc_info:
            payload["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(payload, ensure_ascii=False)


# Loggers whose messages may quote element values: pydicom's warn_and_log() both logs and warns
# texts such as "Invalid value for VR PN: '<patient name>'".
DATASET_LOGGERS = ("pydicom", "highdicom")
# SQLAlchemy logs every result row ("Row %r") at DEBUG.
ROW_LOGGER = "sqlalchemy.engine"


#: pynetdicom's ERROR lines, per logger, for what the node's outbound associations (dicom_node.scu) say
#: themselves: a peer that cannot be reached, rejects the association (result, source, reason), accepts
#: none of its presentation contexts or not one an object needs, aborts or does not answer the request.
#: For the node each is a delivery to retry, which the outbox reports itself (one WARNING with the
#: destination and the reason), a C-ECHO or ``send`` an error naming it; at ERROR they would set off an
#: operator's alerts on every routine retry. They are kept at INFO (shown at DEBUG). None of these lines
#: is logged on the node's listener side: pynetdicom logs them only as the association's requestor.
_SAID_BY_THE_NODE = {
    "pynetdicom.transport": ("Association request failed: unable to connect", "TCP Initialisation Error"),
    "pynetdicom.acse": (
        "Association Rejected",
        "Result: ",
        "Reason: ",
        "No accepted presentation contexts",
        "Association Aborted",
        "ACSE timeout reached while waiting for response to association request",
    ),
    "pynetdicom.association": ("No presentation context for ", "Failed to encode the supplied dataset"),
    # an object the peer accepts only in a transfer syntax pydicom cannot convert it to (dicom_node.scu)
    "pynetdicom.dsutils": ("pydicom.write_dataset() failed:",),
    # the acceptor side reads PDUs in dicom_node.reactor, which logs there: these are the node's requests
    # (a web port's HTTP answer is an "unknown PDU type"; a TLS port closes a plain connection)
    "pynetdicom.dul": (
        "Connection closed before the entire PDU was received",
        "Unknown PDU type received",
        "The received PDU is shorter than expected",
    ),
}
#: pynetdicom's loggers that log an outbound association's TLS failure as a traceback (LOGGER.exception)
_TLS_TRACEBACKS = ("pynetdicom.transport", "pynetdicom.dul")


def _said_by_the_node(record: logging.LogRecord) -> bool:
    """One of :data:`_SAID_BY_THE_NODE`'s lines, or the traceback pynetdicom logs when an outbound
    association fails in TLS (``LOGGER.exception(exc)``: the handshake, or the peer's refusal of the node's
    certificate right after it) or its connection fails while a PDU is read, whose reason the node gives
    (dicom_node.scu). An exception in the DUL's own loop stays an ERROR."""
    said = _SAID_BY_THE_NODE.get(record.name, ())
    if record.name in _TLS_TRACEBACKS and isinstance(record.msg, ssl.SSLError):
        return True
    if record.name == "pynetdicom.dul" and isinstance(record.msg, OSError):
        return True  # the traceback after "Connection closed before the entire PDU was received"
    if record.name == "pynetdicom.dsutils" and isinstance(record.msg, Exception):
        return True  # the traceback after "pydicom.write_dataset() failed:"
    return bool(said) and str(record.msg).startswith(said)


class ValueRedactor(logging.Filter):
    """Drop the text of captured Python warnings and of pydicom/highdicom log records (they quote values),
    and the values of the result rows SQLAlchemy logs at DEBUG (a patient row holds the name and birth
    date; its SQL parameters are hidden already, by ``hide_parameters`` in dicom_node.store.db)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.INFO and _said_by_the_node(record):
            record.levelno, record.levelname = logging.INFO, "INFO"
            return logging.getLogger(record.name).isEnabledFor(logging.INFO)  # shown at DEBUG only
        if record.name == "py.warnings":
            text = record.getMessage()
            # "path:line: Category: message\n  source" -> keep "path:line: Category"
            head = ": ".join(text.split(": ", 2)[:2])
            record.msg = f"{head} (warning text withheld: it may quote dataset values)"
            record.args = None
        elif record.name.split(".")[0] in DATASET_LOGGERS:
            # An exception's traceback would end in its text: only its type is kept.
            error = record.exc_info[1] if record.exc_info else None
            kind = f", {type(error).__name__}" if error is not None else ""
            source = f"{record.levelname.lower()} from {record.name}{kind}"
            record.msg = f"{source} (text withheld: it may quote dataset values)"
            record.args = None
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        elif record.name.startswith(ROW_LOGGER) and str(record.msg).startswith("Row"):
            record.msg = "Row (values withheld: they may be patient data)"
            record.args = None
        elif record.name.split(".")[0] not in _OWN_PACKAGES:
            # APScheduler, uvicorn, SQLAlchemy's pool, concurrent.futures, ...: type, place, reason. The
            # node's own exceptions carry no patient data (dicom_node.errors) and keep their text.
            _exceptions_described(record)
        return True


_OWN_PACKAGES = frozenset({"dicom_node", "classifier", "reporting"})


def _exceptions_described(record: logging.LogRecord) -> None:
    """A record's exceptions, in its arguments or its traceback, as :func:`describe_uncaught` gives them
    (type, place, the driver's or the OS's first line): libraries log an exception's text as it is
    (APScheduler a failed job's, uvicorn a request's), and a database error's later lines quote the
    row's values."""
    if isinstance(record.msg, BaseException):  # pynetdicom's LOGGER.exception(exc): the text is the message
        logged, record.args = record.msg, None
        record.msg = "an exception" if record.exc_info else describe_uncaught(logged).partition("\n")[0]
    if isinstance(record.args, tuple) and any(isinstance(arg, BaseException) for arg in record.args):
        record.args = tuple(
            describe_uncaught(arg).partition("\n")[0] if isinstance(arg, BaseException) else arg
            for arg in record.args
        )
    error = record.exc_info[1] if record.exc_info else None
    if error is not None:
        record.msg, record.args = f"{record.getMessage()}: {describe_uncaught(error)}", None
        record.exc_info, record.exc_text = None, None


def for_command(settings: LoggingSettings) -> LoggingSettings:
    """The logging of an administration command (``ae``, ``user``, ``send``, ``resend``, ``db``): warnings
    and errors only, unless DEBUG is asked for. What the command did it prints itself; the service's
    INFO lines (schema check, audit records) would only bury that on the terminal."""
    if settings.level in ("DEBUG", "ERROR"):
        return settings
    return settings.model_copy(update={"level": "WARNING"})


def configure_logging(settings: LoggingSettings, *, stream: TextIO | None = None) -> None:
    """Install one handler on the root logger (idempotent: replaces handlers set earlier)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if settings.json_format:
        handler.setFormatter(JsonFormatter())
    else:
        # The node's listener processes (dicom_node.listeners) name themselves; the node process does not.
        where = "%(threadName)s" if multiprocessing.parent_process() is None else "%(processName)s/%(threadName)s"
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)-7s %(name)s [{where}] %(message)s"))
    handler.addFilter(ValueRedactor())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.level)
    quiet_level = logging.DEBUG if settings.level == "DEBUG" else logging.WARNING
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(quiet_level, root.level))
    # Re-arm capture: captureWarnings(True) is a no-op when an earlier call is still in effect, and
    # warnings.catch_warnings() blocks (pytest, libraries) may have restored another showwarning.
    logging.captureWarnings(False)
    logging.captureWarnings(True)
    # An exception nothing caught (a thread's, or the main one's) is a log record too: Python would print
    # its traceback to stderr, a plain multi-line text in a JSON log, and its message may quote a dataset.
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread


def _log_uncaught(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, tb)
        return
    logging.getLogger("dicom_node").critical("uncaught %s", describe_uncaught(exc))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is None or issubclass(args.exc_type, SystemExit):
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("dicom_node").critical(
        "thread %s ended by an uncaught %s", name, describe_uncaught(args.exc_value)
    )


def describe_uncaught(exc: BaseException) -> str:
    """Type, stack and — for what cannot quote a dataset — the reason: the operating system's words for an
    OSError ("Name or service not known"), the driver's first line for a database error."""
    from sqlalchemy.exc import DBAPIError

    from dicom_node.errors import describe_exception, driver_reason

    reason = ""
    if isinstance(exc, OSError) and exc.strerror:
        reason = exc.strerror
    elif isinstance(exc, DBAPIError):
        reason = driver_reason(exc.orig)
    text = describe_exception(exc, stack=True)
    if not reason:
        return text
    head, _, stack = text.partition("\n")
    return f"{head}: {reason}\n{stack}"
