"""The talking half of `make run`: watch a LingDeployment form, then ask it something with openai.

`python -m e2e.demo --kubeconfig K --namespace NS --name NAME [--timeout S]` prints progress while the
group forms (the deployment's READY/REPLICAS and each pod's phase), then streams one chat completion
from the rank-0 pod of a Ready group and prints it with the time to the first token. The default
question is the model card's ("What is the capital of France?"); the built-in model was trained to
answer it, so a wrong answer (a broken shard, a wrong all-reduce) fails the demo (exit 1).

Services on this local control plane have no endpoints (Kubernetes refuses loopback addresses in
EndpointSlices, and there is no kube-proxy), so "the Service's rank-0 pod" is found the way the
Service would select it: pods matching its selector that are Ready.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ling_runtime.builtin.data import CARD_ANSWER, CARD_QUESTION

KUBECTL = Path.home() / ".cache" / "ling" / "bin" / "kubectl"


def kubectl_json(kubeconfig: str, *args: str) -> dict[str, Any] | None:
    cmd = [str(KUBECTL), "--kubeconfig", kubeconfig, *args, "-o", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    return json.loads(out.stdout) if out.returncode == 0 else None


def service_endpoint(kubeconfig: str, namespace: str, service: str) -> str | None:
    """IP of a Ready pod selected by the Service (what its endpoints would hold), or None."""
    svc = kubectl_json(kubeconfig, "get", "service", service, "-n", namespace)
    if not svc:
        return None
    selector = ",".join(f"{k}={v}" for k, v in sorted((svc["spec"].get("selector") or {}).items()))
    pods = kubectl_json(kubeconfig, "get", "pods", "-n", namespace, "-l", selector) or {"items": []}
    for pod in sorted(pods["items"], key=lambda p: p["metadata"]["name"]):
        conds = {c["type"]: c["status"] for c in pod.get("status", {}).get("conditions") or []}
        if conds.get("Ready") == "True" and pod["status"].get("podIP"):
            return str(pod["status"]["podIP"])
    return None


def progress_line(kubeconfig: str, namespace: str, name: str) -> tuple[str, int]:
    lingd = kubectl_json(kubeconfig, "get", "lingdeployment", name, "-n", namespace) or {}
    status = lingd.get("status") or {}
    ready = int(status.get("readyReplicas") or 0)
    pods = kubectl_json(
        kubeconfig, "get", "pods", "-n", namespace, "-l", f"serving.ling.dev/deployment={name}"
    ) or {"items": []}
    parts = []
    for pod in sorted(pods["items"], key=lambda p: p["metadata"]["name"]):
        st = pod.get("status") or {}
        conds = {c["type"]: c["status"] for c in st.get("conditions") or []}
        flag = "ready" if conds.get("Ready") == "True" else st.get("phase", "Pending").lower()
        parts.append(f"{pod['metadata']['name']}={flag}@{st.get('podIP', '-')}")
    reasons = [
        f"{c['type']}={c['status']}({c.get('reason', '')})"
        for c in status.get("conditions") or []
        if c["type"] in ("Ready", "RendezvousReady", "Progressing")
    ]
    line = (
        f"groups ready {ready}/{lingd.get('spec', {}).get('replicas', '?')}  "
        f"{' '.join(parts) or 'no pods yet'}  {' '.join(reasons)}"
    )
    return line, ready


def chat(ip: str, model: str, prompt: str) -> tuple[str, float, float]:
    """One streamed chat completion: (text, seconds to first token, seconds in all)."""
    import openai

    client = openai.OpenAI(base_url=f"http://{ip}:30000/v1", api_key="unused", timeout=120, max_retries=0)
    start = time.monotonic()
    first = None
    text = ""
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=24,
        temperature=0,
        stream=True,
    )
    for chunk in stream:
        delta = chunk.choices[0].delta.content if chunk.choices else None
        if delta:
            if first is None:
                first = time.monotonic() - start
            text += delta
    return text, first if first is not None else float("nan"), time.monotonic() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m e2e.demo", description=__doc__)
    p.add_argument("--kubeconfig", required=True)
    p.add_argument("--namespace", required=True)
    p.add_argument("--name", default="ling-tiny")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--prompt", default=CARD_QUESTION)
    args = p.parse_args(argv)

    start = time.monotonic()
    last = ""
    ip = None
    while time.monotonic() - start < args.timeout:
        line, ready = progress_line(args.kubeconfig, args.namespace, args.name)
        if line != last:
            print(f"[{time.monotonic() - start:5.0f}s] {line}", flush=True)
            last = line
        if ready:
            ip = service_endpoint(args.kubeconfig, args.namespace, args.name)
            if ip:
                break
        time.sleep(2)
    if ip is None:
        print(
            f"error: no Ready group after {args.timeout:.0f}s; see `kubectl describe lingd {args.name}`",
            file=sys.stderr,
        )
        return 1
    formed = time.monotonic() - start
    model = (kubectl_json(args.kubeconfig, "get", "lingdeployment", args.name, "-n", args.namespace) or {})[
        "spec"
    ]["model"]["name"]
    text, ttft, total = chat(ip, model, args.prompt)
    print(f"\nthe group formed in {formed:.0f}s; asked http://{ip}:30000/v1 (model {model}): {args.prompt!r}")
    print(f"answer ({ttft:.2f}s to the first token, {total:.2f}s in all): {text!r}")
    print(
        "(the built-in model: a tiny Ling-2.6 - Lightning + MLA layers, MoE, MTP - trained on this machine"
        " on capitals and arithmetic; see docs/model.md)"
    )
    if args.prompt == CARD_QUESTION and text != CARD_ANSWER:
        print(
            f"error: expected {CARD_ANSWER!r}: the served model does not compute what it was trained to",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
