"""The Hugging Face init container, executed: its rendered command against a Hugging Face-compatible
endpoint on loopback serving a real tiny checkpoint (the runtime's built-in one, in the HF layout).

Two pods of one group on one node run the download at the same time into the node cache: exactly one
of them downloads (the server sees one GET per file), the other waits on the lock and then finds every
file in place. Progress lines reach the log; the checkpoint that lands is byte-identical and loads.
While the download runs, the pod's observed state says so (what the conditions then show).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from ling_operator import rendezvous, resources
from ling_operator.pods import ObservedPod
from podstate import OWNER, base_spec, scheduled

from tests.waiting import wait_for

REPO = "inclusionAI/Ling-tiny"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TOKEN = "hf_test_token"


@dataclass
class FakeHub:
    """The endpoints huggingface_hub's snapshot_download and model_info call, over one directory."""

    root: Path
    gate: threading.Event = field(default_factory=threading.Event)  # holds weight transfers until set
    requests: list[tuple[str, str]] = field(default_factory=list)
    unauthorized: list[str] = field(default_factory=list)
    url: str = ""

    def files(self) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(self.root.iterdir()) if p.is_file()}

    def downloads(self, name: str) -> int:
        return sum(1 for method, path in self.requests if method == "GET" and path.endswith(f"/{name}"))


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    files = hub.files()

    class Handler(BaseHTTPRequestHandler):
        def _json(self, payload: object) -> None:
            body = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _authorized(self) -> bool:
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                hub.unauthorized.append(self.path)
                self.send_response(401)
                self.end_headers()
                return False
            return True

        def _file(self, head: bool) -> None:
            prefix = f"/{REPO}/resolve/"
            if not self.path.startswith(prefix):
                self.send_response(404)
                self.end_headers()
                return
            name = self.path[len(prefix) :].split("/", 1)[1].split("?")[0]
            body = files.get(name)
            if body is None:
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if head:
                return
            if name.endswith(".safetensors"):
                half = len(body) // 2
                self.wfile.write(body[:half])  # half of it is on disk while the gate holds the rest
                self.wfile.flush()
                hub.gate.wait(60)
                self.wfile.write(body[half:])
            else:
                self.wfile.write(body)

        def do_HEAD(self) -> None:
            hub.requests.append(("HEAD", self.path))
            if self._authorized():
                self._file(head=True)

        def do_GET(self) -> None:
            hub.requests.append(("GET", self.path))
            if not self._authorized():
                return
            path = self.path.split("?")[0]
            if path.startswith(f"/api/models/{REPO}/tree/"):
                self._json(
                    [
                        {"type": "file", "path": n, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                        for n, b in files.items()
                    ]
                )
            elif path.startswith(f"/api/models/{REPO}/revision/"):
                siblings = [{"rfilename": n, "size": len(b)} for n, b in files.items()]
                self._json({"id": REPO, "sha": COMMIT, "siblings": siblings})
            else:
                self._file(head=False)

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[FakeHub]:
    from ling_runtime.builtin import builtin_model_dir

    hub = FakeHub(Path(builtin_model_dir()))
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        hub.gate.set()
        server.shutdown()
        server.server_close()


def init_container_process(pod: dict, node_cache: Path, log: Path) -> subprocess.Popen[bytes]:
    """Run the pod's init container as the kubelet would: its command (python3 -> this interpreter),
    its env (the Secret resolved), the node cache mounted at /models."""
    (init,) = pod["spec"]["initContainers"]
    command = [sys.executable, *init["command"][1:]]
    mount = rendezvous.MODEL_MOUNT_PATH
    command[-1] = str(node_cache) + command[-1][len(mount) :]
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(node_cache.parent),
        "LING_DOWNLOAD_PROGRESS_SECONDS": "0.2",
    }
    for item in init["env"]:
        if "valueFrom" in item:
            assert item["valueFrom"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
            env[item["name"]] = TOKEN
        else:
            env[item["name"]] = item["value"]
    out = log.open("wb")
    return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)


def test_one_download_per_node_shared_by_the_groups_pods(hub: FakeHub, tmp_path: Path) -> None:
    spec = base_spec(
        model={
            "source": {
                "huggingFace": {
                    "repo": REPO,
                    "revision": "main",
                    "endpoint": hub.url,
                    "tokenSecretRef": {"name": "hf", "key": "token"},
                }
            }
        },
        parallelism={"tensor": 4, "gpusPerPod": 2},
    )
    pods = resources.build_group(OWNER, spec, 0)
    node_cache = tmp_path / "node-cache"  # spec.model.source.huggingFace.nodeCachePath on this node
    logs = [tmp_path / "rank0.log", tmp_path / "rank1.log"]
    first = init_container_process(pods[0], node_cache, logs[0])
    second: subprocess.Popen[bytes] | None = None
    try:
        # Rank 0 holds the lock once its weight transfer has begun; rank 1 starts then, and must wait.
        wait_for("rank 0 to fetch weights", lambda: any(p.endswith(".safetensors") for _, p in hub.requests))
        second = init_container_process(pods[1], node_cache, logs[1])
        wait_for(
            "rank 1 to wait on the node lock", lambda: "waiting for it" in logs[1].read_text(), timeout=60
        )
        wait_for("a progress line", lambda: " on disk, " in logs[0].read_text(), timeout=60)
        hub.gate.set()
        assert first.wait(120) == 0, logs[0].read_text()
        assert second.wait(120) == 0, logs[1].read_text()
    finally:
        hub.gate.set()
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()

    rank0, rank1 = logs[0].read_text(), logs[1].read_text()
    # One download: every file fetched once, by rank 0; rank 1 only checked the revision.
    for name in hub.files():
        assert hub.downloads(name) == 1, (name, hub.requests)
    assert not hub.unauthorized  # the token from the Secret reached the endpoint
    assert "model-download: downloading inclusionAI/Ling-tiny@main" in rank0
    total = sum(len(b) for b in hub.files().values()) / 2**30
    assert f"of {total:.2f} GiB (" in rank0 and "%)" in rank0  # progress against the repo's size
    assert "model-download: complete" in rank0 and "model-download: complete" in rank1
    assert "another pod on this node is downloading" in rank1

    # The checkpoint landed where the engine's --model-path points, intact, and loads.
    target = node_cache / rendezvous.hf_checkpoint_dir(REPO, "main")[len(rendezvous.MODEL_MOUNT_PATH) + 1 :]
    command = resources.build_pod(OWNER, spec, 0, 0)["spec"]["containers"][0]["command"]
    assert command[command.index("--model-path") + 1].endswith("/inclusionAI--Ling-tiny/main")
    for name, body in hub.files().items():
        assert (target / name).read_bytes() == body
    from ling_runtime.config import LingConfig
    from ling_runtime.text.tokenizer import TokenizerBundle

    assert LingConfig.from_hf(target).num_hidden_layers >= 1
    assert TokenizerBundle.from_dir(target).vocab_size > 0


def test_a_pod_downloading_weights_says_so() -> None:
    spec = base_spec(model={"source": {"huggingFace": {"repo": REPO}}})
    pod = scheduled(resources.build_pod(OWNER, spec, 0, 0))
    pod["status"]["initContainerStatuses"] = [
        {
            "name": resources.DOWNLOAD_CONTAINER_NAME,
            "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}},
        }
    ]
    pod["status"]["containerStatuses"] = [
        {"name": "engine", "state": {"waiting": {"reason": "PodInitializing"}}}
    ]
    observed = ObservedPod.from_k8s(pod)
    assert observed.waiting == (
        "model-download: downloading the weights (progress: kubectl logs -c model-download)",
    )
