"""The administration CLI against DCMTK storescp as the destination (what an admin types)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.store.db import make_engine
from dicom_node.store.models import AuditEvent
from tests import peers
from tests.node_datasets import make_cr, write
from tests.node_process import node_env, run_cli

pytestmark = pytest.mark.interop


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    out = tmp_path / "received"
    out.mkdir()
    port = peers.free_port()
    log = (tmp_path / "storescp.log").open("wb")  # -v: one line per request, with its Message ID
    proc = subprocess.Popen([peers.executable("storescp"), "-v", "+xa", "-aet", "STORESCP", "-od", str(out),
                             str(port)],
                            env={**os.environ, "TCP_NODELAY": "1"}, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    import socket

    while True:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                break
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"storescp did not listen on port {port} (exit code {proc.poll()})")
        time.sleep(0.05)
    yield port, out
    proc.send_signal(signal.SIGTERM)
    proc.wait(20)
    log.close()


def test_destination_admin_echo_and_send(storescp: tuple[int, Path], tmp_path: Path) -> None:
    port, received = storescp
    env = node_env(tmp_path / "node", peers.free_port())
    # Run where no node database is (another directory, or without the service's environment), an AE
    # title was added to a new database the node never read; it is refused and says why.
    refused = run_cli(["ae", "add", "--role", "caller", "--aet", "MODALITY"], env, check=False)
    assert refused.returncode == 2 and "no node database at" in refused.stderr
    assert not (tmp_path / "node" / "cxr-node.sqlite3").exists()
    run_cli(["db", "upgrade"], env)
    run_cli(["ae", "add", "--role", "destination", "--aet", "STORESCP", "--host", "127.0.0.1", "--port", str(port)],
            env)
    routed = run_cli(["ae", "add", "--role", "caller", "--aet", "MODALITY", "--reply-to", "STORESCP"], env)
    database = (tmp_path / "node" / "cxr-node.sqlite3").resolve()
    assert f"database: SQLite file {database}" in routed.stderr  # which database the command changed
    assert "go nowhere" not in routed.stderr
    unrouted = run_cli(["ae", "add", "--role", "caller", "--aet", "VIEWER"], env)  # no reply-to, no fixed one
    assert "warning: results of studies from VIEWER go nowhere" in unrouted.stderr
    run_cli(["ae", "add", "--role", "destination", "--aet", "ARCHIVE", "--host", "127.0.0.1", "--port", "104",
             "--storage-commitment"], env)
    listed = run_cli(["ae", "list"], env)
    assert "STORESCP" in listed.stdout and "MODALITY" in listed.stdout
    commit = listed.stdout.splitlines()[0].index("COMMIT")  # the column says which destination is asked
    assert {line.split()[1]: line[commit:commit + 3] for line in listed.stdout.splitlines()[1:]
            if line.startswith("destination")} == {"ARCHIVE": "yes", "STORESCP": "no "}
    refused = run_cli(["ae", "add", "--role", "caller", "--aet", "X", "--storage-commitment"], env,
                      check=False)
    assert refused.returncode != 0 and "storage commitment applies to destinations only" in refused.stderr
    assert listed.stderr == f"database: SQLite file {database}\n"  # its answer; the INFO log stays out
    assert "C-ECHO STORESCP" in run_cli(["ae", "echo", "STORESCP"], env).stdout
    assert run_cli(["echo", "127.0.0.1", str(port), "STORESCP"], env).returncode == 0

    folder = tmp_path / "outgoing"
    folder.mkdir()
    small = [write(make_cr(seed=i), folder / f"{i}.dcm") for i in range(2)]
    jpeg2000 = peers.pydicom_data_file("RG1_J2KR.dcm")
    sent = run_cli(["send", str(folder), str(jpeg2000), "--to", "STORESCP"], env, timeout=120)
    assert "sent 3 of 3" in sent.stdout
    requests = re.findall(r"Received Store Request \(MsgID (\d+)", (tmp_path / "storescp.log").read_text())
    assert requests == ["1", "2", "3"]  # one association, a Message ID per request (PS3.7 9.3.1.1)
    names = {dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in received.iterdir()}
    assert set(names) == {dcmread(p).SOPInstanceUID for p in [*small, jpeg2000]}
    j2k_copy = dcmread(names[dcmread(jpeg2000).SOPInstanceUID], stop_before_pixels=True)
    assert j2k_copy.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"  # sent as is, not re-encoded

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not DICOM")
    nothing = run_cli(["send", str(empty), "--to", "STORESCP"], env, check=False)
    assert nothing.returncode == 2 and "no DICOM file in the paths given: nothing sent" in nothing.stderr
    log = (tmp_path / "storescp.log").read_text()
    assert len(re.findall(r"Received Store Request", log)) == 3  # no association for nothing

    run_cli(["ae", "remove", "STORESCP"], env)
    assert "STORESCP" not in run_cli(["ae", "list", "--role", "destination"], env).stdout
    failed = run_cli(["send", str(small[0]), "--to", "STORESCP"], env, check=False)
    assert failed.returncode != 0 and "no destination AE" in failed.stderr

    engine = make_engine(f"sqlite:///{tmp_path / 'node' / 'cxr-node.sqlite3'}")
    with Session(engine) as session:
        actions = session.scalars(select(AuditEvent.action).order_by(AuditEvent.id)).all()
    engine.dispose()
    assert actions == ["ae.add", "ae.add", "ae.add", "ae.add", "ae.echo", "send", "ae.remove"]


def test_echo_to_nothing_fails_cleanly(tmp_path: Path) -> None:
    env = node_env(tmp_path / "node", peers.free_port())
    result = run_cli(["echo", "127.0.0.1", str(peers.free_port()), "NOBODY"], env, check=False)
    assert result.returncode == 2 and "error: cannot connect to NOBODY" in result.stderr
    assert "(Connection refused)" in result.stderr  # the network's own words


def test_python_dash_m_is_the_cli() -> None:
    result = subprocess.run([sys.executable, "-m", "dicom_node", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and "cxr-node" in result.stdout


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"dicom: {port: [\n", "is not valid YAML"),  # an unclosed bracket, as an admin's typo leaves it
        (b"pipeline:\n  batch_size: twelve\n", "invalid settings"),
        (b"\xff\xfe not text", "invalid settings"),
        # a misspelt key inside a group left the default in force without a word
        (b"storage:\n  retention_day: 30\n", "storage.retention_day: unknown setting (in "),
        (b"dicom:\n  tls: {enable: true}\n", "dicom.tls.enable: unknown setting (in "),
    ],
)
def test_a_broken_configuration_file_is_one_line_that_says_what(
    tmp_path: Path, content: bytes, message: str
) -> None:
    config = tmp_path / "node.yaml"
    config.write_bytes(content)
    env = node_env(tmp_path / "node", peers.free_port())
    result = run_cli(["serve", "--config", str(config)], env, check=False)
    assert result.returncode == 2 and result.stderr.startswith("error: ")
    assert message in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1  # one line: pydantic's own text took four an error (review)


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        # a typo in the environment is an error too, named by its variable (pydantic's text said "for
        # FileSettings" in four lines: review)
        ("CXR_NODE__DICOM__PROT", "104",
         "invalid settings: dicom.prot: unknown setting (from CXR_NODE__DICOM__PROT)"),
        ("CXR_NODE__DICOMM__PORT", "104",
         "unknown settings group in the environment: CXR_NODE__DICOMM__PORT"),
        # one underscore: the URL was not read, and the node ran on an SQLite file of its own (review)
        ("CXR_NODE_DATABASE__URL", "postgresql+psycopg://cxr:s3cr3t@127.0.0.1/cxr",
         "unknown variable in the environment: CXR_NODE_DATABASE__URL"),
        ("CXR_NODE__DATABASE__URL", "postgresql+psycopg://cxr:s3cr3t@127.0.0.1:{port}/cxr",
         "the database cannot be reached: connection failed"),
        ("CXR_NODE__DATABASE__URL", "postgres://cxr:s3cr3t@127.0.0.1/cxr", "use postgresql+psycopg://"),
        ("CXR_NODE__DATABASE__URL", "postgresql://cxr:s3cr3t@127.0.0.1/cxr", "use postgresql+psycopg://"),
        ("CXR_NODE__DATABASE__URL", "localhost:5432/cxr", "database.url is not a database URL"),
        ("CXR_NODE__DATABASE__URL", "postgresql+psycopg://cxr:s3cr3t@127.0.0.1:notaport/cxr",
         "database.url is not a database URL"),
    ],
)
def test_a_wrong_setting_or_unreachable_database_is_one_line_that_says_what(
    tmp_path: Path, setting: str, value: str, message: str
) -> None:
    """Each was a Python traceback of a hundred lines (every 5 s under systemd's restart), or silence."""
    extra = {setting: value.format(port=peers.free_port())}
    env = node_env(tmp_path / "node", peers.free_port(), extra=extra)
    for command in (["db", "upgrade"], ["serve"]):  # serve takes the node lock first: the same answer
        result = run_cli(command, env, check=False)
        assert result.returncode == 2 and result.stderr.startswith("error: "), (command, result.stderr)
        assert message in result.stderr and result.stderr.count("\n") == 1
        assert "uncaught" not in result.stderr and "Traceback" not in result.stderr
        assert "s3cr3t" not in result.stderr + result.stdout
