"""Finding the real peers (DCMTK, dicom3tools, Orthanc, PostgreSQL, Chromium) for the tests.

Locally a missing peer skips the test that needs it; in CI (``CI=true`` or ``--require-peers``) it fails.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REQUIRE_PEERS = False  # set by conftest: --require-peers, CXR_REQUIRE_PEERS=1 or CI=true


def missing(reason: str) -> None:
    """Skip, or fail when peers are required."""
    if REQUIRE_PEERS:
        pytest.fail(f"required peer missing: {reason}", pytrace=False)
    pytest.skip(reason)


def on_path(name: str) -> str | None:
    """``name`` on PATH, passing over the virtual environment's own ``bin``: pynetdicom installs scripts
    named ``storescp``, ``storescu`` and ``echoscu`` there, which an activated environment would
    otherwise put before DCMTK's."""
    own = Path(sys.prefix, "bin").resolve()
    path = os.pathsep.join(
        entry for entry in os.environ.get("PATH", os.defpath).split(os.pathsep)
        if entry and Path(entry).resolve() != own
    )
    return shutil.which(name, path=path)


def executable(name: str, *candidates: str) -> str:
    """Path of a peer executable (``name`` on PATH, see :func:`on_path`, or one of ``candidates``)."""
    found = on_path(name)
    if found:
        return found
    for candidate in candidates:
        if Path(candidate).is_file():
            return candidate
    missing(f"{name} not installed (Debian package needed; `make test` installs it)")
    raise AssertionError("unreachable")


_HANDED_OUT: set[int] = set()


def _ephemeral_low() -> int:
    """The first port the kernel hands to outgoing connections (32768 unless configured otherwise)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback TCP port free now, for a peer that binds it later, never the same one twice in a run.

    Taken below the kernel's ephemeral range: an ephemeral port could become the source port of one of
    the suite's many outgoing connections before its server binds it (an Orthanc started minutes later).
    """
    high = _ephemeral_low() - 1
    low = max(1024, high - 12000)
    for _ in range(1000):
        port = random.randint(low, high)
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free port in {low}-{high}")


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Until ``process`` (a peer just started) accepts connections on loopback ``port``.

    The port must be the process's own: a free port is free only within this test run, and a test run
    alongside (a developer's, on the same machine) may have bound it meanwhile. The peer then fails to
    bind and exits, but a connection made before it did reached the other run's server, and the test
    talked to a stranger (a rejection test once saw another configuration's answer)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the peer for port {port} exited early (exit {process.returncode})")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                pass
        except OSError:
            time.sleep(0.05)
            continue
        if _listens(process.pid, port) is not False:
            return
        time.sleep(0.05)  # another process's: unless ours binds it yet, it exits, and that is said above
    raise TimeoutError(f"the peer did not listen on port {port} within {timeout} s")


def _listens(pid: int, port: int) -> bool | None:
    """Whether process ``pid`` holds a socket listening on TCP ``port`` (Linux /proc); None if unknown."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                    inodes.add(f"socket:[{fields[9]}]")
    try:
        descriptors = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for descriptor in descriptors:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{descriptor}") in inodes:
                return True
    return False


def pydicom_data_file(name: str) -> Path:
    """A file from the PyPI package pydicom-data (e.g. ``RG1_UNCI.dcm``)."""
    try:
        from pydicom.data import get_testdata_file
    except ImportError:  # pragma: no cover
        missing("pydicom not installed")
        raise
    path = get_testdata_file(name, download=False)
    if path is None:
        missing(f"{name} not available: install the PyPI package pydicom-data")
        raise AssertionError("unreachable")
    return Path(str(path))


def self_signed_certificate(folder: Path, name: str = "node") -> tuple[Path, Path]:
    """A one-day self-signed certificate and its key, made with OpenSSL (CN cxr-node-test)."""
    openssl = executable("openssl")
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=cxr-node-test", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


@contextlib.contextmanager
def serving(command: list[str], port: int) -> Iterator[None]:
    """Run a peer that listens on loopback ``port``, from when it listens until the block ends."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, process)
        yield
    finally:
        process.terminate()
        process.wait(timeout=10)


@contextlib.contextmanager
def dcmqrscp(folder: Path, ae_title: str) -> Iterator[int]:
    """DCMTK dcmqrscp on a free loopback port, answering to ``ae_title`` only: an association calling any
    other title is rejected (permanent, service user, "called AE title not recognised"), as Orthanc with
    ``DicomCheckCalledAet`` does. DCMTK's storescp accepts any called AE title. Yields the port."""
    exe = executable("dcmqrscp")
    port = free_port()
    storage = folder / "dcmqrscp"
    storage.mkdir(parents=True)
    config = folder / "dcmqrscp.cfg"
    config.write_text(
        f"NetworkTCPPort = {port}\nMaxPDUSize = 16384\nMaxAssociations = 4\n"
        "HostTable BEGIN\nHostTable END\nVendorTable BEGIN\nVendorTable END\n"
        f"AETable BEGIN\n{ae_title} {storage} RW (10, 64mb) ANY\nAETable END\n"
    )
    with serving([exe, "-c", str(config)], port):
        yield port


@contextlib.contextmanager
def storescp_accepting(
    folder: Path, ae_title: str, sop_class: str,
    syntaxes: tuple[str, ...] = ("LocalEndianExplicit", "LittleEndianImplicit"),
) -> Iterator[int]:
    """DCMTK storescp on a free loopback port that accepts one SOP class (a DCMTK keyword such as
    ``CTImageStorage``), uncompressed (in ``syntaxes``, DCMTK's names), and refuses every other presentation
    context: the profile of a PACS that does not store what it is sent. Yields the port."""
    exe = executable("storescp")
    port = free_port()
    config = folder / "storescp-profile.cfg"
    listed = "".join(f"TransferSyntax{number} = {name}\n" for number, name in enumerate(syntaxes, start=1))
    config.write_text(
        f"[[TransferSyntaxes]]\n[Uncompressed]\n{listed}"
        f"[[PresentationContexts]]\n[Only]\nPresentationContext1 = {sop_class}\\Uncompressed\n"
        "[[Profiles]]\n[Only]\nPresentationContexts = Only\n"
    )
    out = folder / "storescp"
    out.mkdir(parents=True)
    with serving([exe, "--aetitle", ae_title, "-xf", str(config), "Only", "--output-directory", str(out),
                  str(port)], port):
        yield port
