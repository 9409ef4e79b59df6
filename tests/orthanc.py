"""A real Orthanc (Debian package) as the hospital PACS in interop tests and the e2e benchmark.

Each :class:`OrthancServer` gets its own temp configuration, storage and index, listens on free loopback
ports (DICOM and HTTP), knows the node as a DICOM modality and, optionally, forwards every instance it
stores (or every stable study) to the node with a Lua script — exactly how a hospital routes studies to an
AI node. It is stopped by PID. REST checks go through httpx.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests import peers

ORTHANC_AET = "ORTHANC"

# Forward what a modality sends to the node; never send the node's own results back to it.
_FORWARD_INSTANCE_LUA = """
function OnStoredInstance(instanceId, tags, metadata, origin)
  if origin ~= nil and origin['RemoteAet'] == '{node_aet}' then
    return
  end
  local modality = tags['Modality']
  if modality == 'SR' or modality == 'DOC' or modality == 'OT' then
    return
  end
  SendToModality(instanceId, 'node')
end
"""

# Stable-study routing: the whole study once it has been quiet for StableAge seconds. (The node's results
# make the study change again; the second forward of the same image is an idempotent no-op at the node.)
_FORWARD_STABLE_STUDY_LUA = """
function OnStableStudy(studyId, tags, metadata)
  local series = ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))
  for i, s in pairs(series) do
    local modality = s['MainDicomTags']['Modality']
    if modality ~= 'SR' and modality ~= 'DOC' and modality ~= 'OT' then
      for j, instanceId in pairs(s['Instances']) do
        SendToModality(instanceId, 'node')
      end
    end
  end
end
"""


@dataclass
class NodeAddress:
    """Where Orthanc reaches the node (its DicomModalities entry ``node``)."""

    ae_title: str
    port: int
    host: str = "127.0.0.1"


class OrthancServer:
    """One Orthanc process with its own directory; start/stop repeatedly on the same ports and storage."""

    def __init__(
        self,
        workdir: Path,
        *,
        node: NodeAddress | None = None,
        forward: str | None = "instance",  # "instance", "stable-study" or None
        stable_age: int = 1,
        ae_title: str = ORTHANC_AET,
        dicom_port: int | None = None,
        lua: str = "",
    ) -> None:
        self.executable = peers.executable("Orthanc", "/usr/sbin/Orthanc")
        self.workdir = workdir
        self.ae_title = ae_title
        self.dicom_port = dicom_port or peers.free_port()
        self.http_port = peers.free_port()
        self.node = node
        self.forward = forward if node is not None else None
        self.stable_age = stable_age
        self.lua = lua  # a Lua script of the test's own (e.g. a ReceivedInstanceFilter), besides forwarding
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "orthanc.log"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._write_config()

    # Configuration ------------------------------------------------------------------------------

    def _write_config(self) -> None:
        storage = self.workdir / "storage"
        storage.mkdir(exist_ok=True)
        (self.workdir / "tmp").mkdir(exist_ok=True)
        scripts: list[str] = []
        if self.forward is not None and self.node is not None:
            template = _FORWARD_INSTANCE_LUA if self.forward == "instance" else _FORWARD_STABLE_STUDY_LUA
            script = self.workdir / "forward.lua"
            script.write_text(template.replace("{node_aet}", self.node.ae_title))
            scripts.append(str(script))
        if self.lua:
            own = self.workdir / "own.lua"
            own.write_text(self.lua)
            scripts.append(str(own))
        modalities: dict[str, list[Any]] = {}
        if self.node is not None:
            modalities["node"] = [self.node.ae_title, self.node.host, self.node.port]
        config = {
            "Name": f"orthanc-test-{self.dicom_port}",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "TemporaryDirectory": str(self.workdir / "tmp"),
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomModalities": modalities,
            "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": False,
            "LuaScripts": scripts,
            "Plugins": [],
            "StableAge": self.stable_age,
            "DicomScuTimeout": 10,
            "DicomAssociationCloseDelay": 0,
            "ConcurrentJobs": 2,
            "SaveJobs": False,
            "MaximumStorageCacheSize": 0,
            "HttpTimeout": 30,
        }
        (self.workdir / "orthanc.json").write_text(json.dumps(config, indent=2))

    def set_node(self, node: NodeAddress, *, forward: bool = True) -> None:
        """Point the ``node`` modality (and, with ``forward``, forwarding) at ``node``; takes effect at the
        next start()."""
        self.node = node
        if forward and self.forward is None:
            self.forward = "instance"
        self._write_config()

    # Process -------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 30.0) -> None:
        if self.process is not None:
            raise RuntimeError("Orthanc already running")
        log = self.log_path.open("ab")
        env = dict(os.environ, TCP_NODELAY="1")
        self.process = subprocess.Popen(
            [self.executable, f"--logfile={self.workdir / 'orthanc-core.log'}", str(self.workdir / "orthanc.json")],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            env=env,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}; see {self.log_path}")
            try:
                if httpx.get(f"{self.url}/system", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout} s; see {self.log_path}")

    def stop(self, timeout: float = 20.0) -> None:
        """Stop by PID: SIGTERM, then SIGKILL if Orthanc does not exit in time."""
        if self.process is None:
            return
        process, self.process = self.process, None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)

    # REST ----------------------------------------------------------------------------------------

    def get(self, path: str) -> Any:
        response = httpx.get(f"{self.url}{path}", timeout=30.0)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: Any) -> Any:
        response = httpx.post(f"{self.url}{path}", content=body if isinstance(body, bytes) else json.dumps(body),
                              timeout=60.0)
        response.raise_for_status()
        return response.json()

    def instances(self) -> list[str]:
        return [str(i) for i in self.get("/instances")]

    def tags(self, instance_id: str) -> dict[str, Any]:
        return dict(self.get(f"/instances/{instance_id}/simplified-tags"))

    def by_modality(self, study_instance_uid: str, modality: str) -> list[str]:
        """Instance ids in the study whose series has ``modality`` (e.g. SR, DOC)."""
        result: list[str] = []
        for series in self.post("/tools/find", {"Level": "Series", "Expand": True,
                                                "Query": {"StudyInstanceUID": study_instance_uid,
                                                          "Modality": modality}}):
            result.extend(str(i) for i in series["Instances"])
        return result

    def remote_aet(self, instance_id: str) -> str:
        response = httpx.get(f"{self.url}/instances/{instance_id}/metadata/RemoteAET", timeout=10.0)
        return response.text if response.status_code == 200 else ""
