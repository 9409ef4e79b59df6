"""Whole-PDU reads on the listener's sockets: exact bytes, and memory bounded by what arrives."""

from __future__ import annotations

import socket
import threading
import tracemalloc
from types import SimpleNamespace
from typing import Any, cast

import pytest

from dicom_node.scp import _recv_exact

pytestmark = [pytest.mark.unit]


def _read(sock: socket.socket, nr_bytes: int) -> bytearray:
    return _recv_exact(cast(Any, SimpleNamespace(socket=sock)), nr_bytes)


def test_a_large_pdu_arrives_whole_and_exact() -> None:
    payload = bytes(range(256)) * (3 * 4096 + 7)  # ~3 MiB: the buffer grows twice
    ours, peer = socket.socketpair()
    with ours, peer:
        sender = threading.Thread(target=peer.sendall, args=(payload,))
        sender.start()
        assert _read(ours, len(payload)) == payload
        sender.join()


def test_a_claimed_4_gib_pdu_costs_only_what_the_peer_sends() -> None:
    ours, peer = socket.socketpair()
    with ours:
        with peer:
            peer.sendall(b"x" * 100)
        tracemalloc.start()
        try:
            data = _read(ours, 0xFFFFFFFF)  # the largest length a PDU header can announce
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert data == b"x" * 100  # short: the peer closed the connection
    assert peak < 4 * 1024 * 1024
