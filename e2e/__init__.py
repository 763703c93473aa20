"""End-to-end scenarios on the local control plane with executed pods (marker `e2e`)."""
