"""Logging set-up: captured warnings and logged rows lose their values (they may be PHI), JSON lines parse."""

from __future__ import annotations

import io
import json
import logging
import sys
import threading
import warnings

import pytest

from dicom_node.logconfig import configure_logging
from dicom_node.settings import LoggingSettings

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("restore_logging")]


def test_an_uncaught_exception_is_one_json_record_without_its_text() -> None:
    """A thread ended by an exception printed a plain multi-line traceback into the JSON log, with the
    exception's text (which may quote a dataset)."""
    stream = io.StringIO()
    configure_logging(LoggingSettings(level="INFO", json_format=True), stream=stream)

    secret = "ZZ" + "SECRET"  # the source lines of the stack are logged: keep the value out of them

    def fail() -> None:
        raise ValueError(f"Invalid value for PN: '{secret}^NAME'")

    worker = threading.Thread(target=fail, name="settle-arm")
    worker.start()
    worker.join()
    try:
        raise KeyError(secret)
    except KeyError as exc:
        sys.excepthook(type(exc), exc, exc.__traceback__)
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [r["level"] for r in records] == ["CRITICAL", "CRITICAL"]
    assert records[0]["message"].startswith("thread settle-arm ended by an uncaught ValueError at ")
    assert records[1]["message"].startswith("uncaught KeyError at ")
    assert "ZZSECRET" not in stream.getvalue()


def test_warning_text_is_withheld_and_lines_are_json() -> None:
    stream = io.StringIO()
    configure_logging(LoggingSettings(level="INFO", json_format=True), stream=stream)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("Invalid value for VR PN: 'ZZSECRET^NAME'", UserWarning, stacklevel=1)
    logging.getLogger("dicom_node.test").info("stored instance %d", 7)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert any(line["message"] == "stored instance 7" for line in lines)
    assert "ZZSECRET" not in stream.getvalue()
    assert any("UserWarning" in line["message"] for line in lines)


def test_third_party_loggers_stay_at_warning_unless_debug() -> None:
    configure_logging(LoggingSettings(level="INFO"), stream=io.StringIO())
    assert logging.getLogger("pynetdicom").getEffectiveLevel() == logging.WARNING
    configure_logging(LoggingSettings(level="DEBUG"), stream=io.StringIO())
    assert logging.getLogger("pynetdicom").getEffectiveLevel() == logging.DEBUG


def test_pydicom_log_records_lose_their_text() -> None:
    stream = io.StringIO()
    configure_logging(LoggingSettings(level="INFO"), stream=stream)
    logging.getLogger("pydicom").warning("Invalid value for VR PN: 'ZZSECRET^NAME'")
    text = stream.getvalue()
    assert "ZZSECRET" not in text
    assert "warning from pydicom" in text


@pytest.mark.parametrize("json_format", [False, True])
def test_a_pydicom_record_with_an_exception_keeps_its_type_not_its_text(json_format: bool) -> None:
    """pydicom's decoders log ``LOGGER.exception(exc)``: the message was withheld, but the traceback that
    followed it ended in the exception's own text."""
    stream = io.StringIO()
    configure_logging(LoggingSettings(level="INFO", json_format=json_format), stream=stream)
    try:
        raise RuntimeError("Invalid value for VR PN: 'ZZSECRET^NAME'")
    except RuntimeError as exc:
        logging.getLogger("pydicom.pixels.decoders.base").exception(exc)
    text = stream.getvalue()
    assert "ZZSECRET" not in text
    assert "error from pydicom.pixels.decoders.base" in text and "RuntimeError" in text


def test_apschedulers_records_of_a_failed_job_give_the_exceptions_type_and_reason_not_its_text() -> None:
    """APScheduler logs a job's exception with its traceback, and a job store's error as a message
    argument: a database error's later lines (psycopg's DETAIL) quote the values of the row."""
    from sqlalchemy.exc import IntegrityError

    stream = io.StringIO()
    configure_logging(LoggingSettings(level="INFO"), stream=stream)
    error = IntegrityError("INSERT ...", {}, Exception("duplicate key value\nDETAIL: Key (name)=(ZZSECRET)"))
    try:
        raise error
    except IntegrityError:
        logging.getLogger("apscheduler.executors.default").exception('Job "%s" raised an exception', "sweep")
        for name in ("uvicorn.error", "sqlalchemy.pool.impl.QueuePool", "concurrent.futures"):
            logging.getLogger(name).error("%s failed", name, exc_info=True)
        logging.getLogger("pynetdicom.events").exception(error)  # the exception as the message (review)
    logging.getLogger("pynetdicom.dul").error(error)
    logging.getLogger("apscheduler.scheduler").warning("Error getting due jobs from job store %r: %s",
                                                       "default", error)
    text = stream.getvalue()
    assert "ZZSECRET" not in text
    assert 'Job "sweep" raised an exception: IntegrityError at ' in text
    assert "Error getting due jobs from job store 'default': IntegrityError at " in text
    assert text.count(": duplicate key value\n") == 7  # the driver's first line: what went wrong
    assert "uvicorn.error failed: IntegrityError at " in text


def test_warning_capture_survives_an_earlier_configuration() -> None:
    # An entry point configured logging before, then a catch_warnings() block (as pytest and some
    # libraries use) swapped showwarning: configuring again must route warnings to the log again.
    configure_logging(LoggingSettings(level="INFO"), stream=io.StringIO())
    with warnings.catch_warnings(record=True):
        test_warning_text_is_withheld_and_lines_are_json()


def test_sqlalchemy_result_rows_lose_their_values_at_debug() -> None:
    """At DEBUG SQLAlchemy logs every row it reads; a patient row holds the name and birth date."""
    stream = io.StringIO()
    configure_logging(LoggingSettings(level="DEBUG"), stream=stream)
    engine_log = logging.getLogger("sqlalchemy.engine.Engine")
    engine_log.debug("Row %r", (3, "ZZSECRET", "ZZSECRET^NAME", "19700101", "F"))
    engine_log.debug("Col %r", ("patient_id", "name"))
    text = stream.getvalue()
    assert "ZZSECRET" not in text and "19700101" not in text
    assert "Row (values withheld" in text and "Col ('patient_id', 'name')" in text


def test_an_unreachable_peer_is_the_outboxs_warning_not_two_pynetdicom_errors() -> None:
    """Each retry to a PACS that was down logged two pynetdicom ERROR lines beside the node's WARNING."""
    stream = io.StringIO()
    configure_logging(LoggingSettings(level="INFO", json_format=True), stream=stream)
    transport = logging.getLogger("pynetdicom.transport")
    transport.error("Association request failed: unable to connect to remote")
    transport.error("TCP Initialisation Error: [Errno 111] Connection refused")
    transport.error("some other transport failure")  # still an ERROR
    assert [json.loads(line)["message"] for line in stream.getvalue().splitlines()] == [
        "some other transport failure"
    ]
    stream = io.StringIO()
    configure_logging(LoggingSettings(level="DEBUG", json_format=True), stream=stream)
    transport.error("TCP Initialisation Error: [Errno 111] Connection refused")
    assert [json.loads(line)["level"] for line in stream.getvalue().splitlines()] == ["INFO"]


def test_an_uncaught_os_error_keeps_the_operating_systems_reason() -> None:
    """Only the type and place were logged: "uncaught gaierror at socket.py:962", without "Name or service
    not known" (found by review). The system's words cannot quote a dataset."""
    stream = io.StringIO()
    configure_logging(LoggingSettings(level="INFO", json_format=True), stream=stream)
    try:
        raise ConnectionRefusedError(111, "Connection refused")
    except ConnectionRefusedError as exc:
        sys.excepthook(type(exc), exc, exc.__traceback__)
    (record,) = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert record["message"].splitlines()[0].startswith("uncaught ConnectionRefusedError at ")
    assert record["message"].splitlines()[0].endswith(": Connection refused")
