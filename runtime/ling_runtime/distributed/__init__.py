"""Launchers (Ray, mp) and torch.distributed helpers for tensor-parallel shards."""
