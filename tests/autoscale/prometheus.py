"""A real Prometheus (Debian's package, via hack/prometheus.sh) on loopback, for the autoscaler's tests."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "hack" / "prometheus.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bcrypt_hash(password: str) -> str:
    # Prometheus' web config wants bcrypt; the stdlib's crypt (libxcrypt) makes one without a new dependency.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt

    return crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))


@dataclass(frozen=True)
class Prometheus:
    url: str
    authorization: str | None  # header value that the server accepts, when it requires auth

    def query(self, promql: str) -> dict:
        request = urllib.request.Request(
            f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql}),
            headers={"Authorization": self.authorization} if self.authorization else {},
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=5) as response:
            return json.loads(response.read())


@contextmanager
def run_prometheus(
    targets: list[str], *, password: str | None = None, interval: str = "1s"
) -> Iterator[Prometheus]:
    """Prometheus scraping `targets` ("host:port") every `interval`, optionally behind basic auth."""
    with tempfile.TemporaryDirectory(prefix="prom-") as tmp:
        config = Path(tmp) / "prometheus.yml"
        config.write_text(
            json.dumps(
                {
                    "global": {"scrape_interval": interval, "evaluation_interval": interval},
                    "scrape_configs": [{"job_name": "ling", "static_configs": [{"targets": targets}]}],
                }
            )
        )
        args = ["bash", str(SCRIPT), "run", str(config), str(port := free_port()), str(Path(tmp) / "data")]
        authorization = None
        if password is not None:
            web = Path(tmp) / "web.yml"
            web.write_text(json.dumps({"basic_auth_users": {"ling": bcrypt_hash(password)}}))
            args.append(f"--web.config.file={web}")
            authorization = "Basic " + base64.b64encode(f"ling:{password}".encode()).decode()
        log = open(Path(tmp) / "prometheus.log", "wb")  # noqa: SIM115 -- closed below
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                if process.poll() is not None:
                    raise RuntimeError(
                        f"prometheus exited: {(Path(tmp) / 'prometheus.log').read_text()[-2000:]}"
                    )
                try:
                    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
                    opener.open(f"{url}/-/ready", timeout=1).close()
                    break
                except urllib.error.HTTPError as exc:
                    if exc.code == 401:  # up, and asking for credentials
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("prometheus did not become ready in 60 s")
                time.sleep(0.2)
            yield Prometheus(url, authorization)
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()
