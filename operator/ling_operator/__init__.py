"""Kubernetes operator for LingDeployment: reconciles serving groups of the Ling runtime."""

__version__ = "0.1.0"
