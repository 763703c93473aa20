"""The pod executor: runs pods bound to "local execution" nodes as local processes.

Test and development infrastructure (a tiny kubelet for the local control plane), not part of the
product. `python -m e2e.executor --kubeconfig K --node NAME`; docs/e2e.md explains it.
"""
