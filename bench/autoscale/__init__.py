"""Autoscaling simulation: our queue-depth policy vs an HPA/KEDA-style baseline."""
