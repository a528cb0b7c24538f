"""`vmsandbox serve` as its own process (the CLI), as a node runs it (hack/vsbench/node.py)."""

from vsbench.node import Serve

__all__ = ["Serve"]
