"""Peer libraries for the benchmarks, run in a side environment (``.peers-venv``), never in ``.venv``.

Standard library only on this side: ``client.PeerProcess`` starts a worker (``sparseprop_worker.py``) with the side
environment's interpreter and exchanges JSON lines with it; ``setup_peers.sh`` builds that environment.
"""

from .client import PeerError, PeerProcess, available, default_venv, peer_python, setup_peers

__all__ = ["PeerError", "PeerProcess", "available", "default_venv", "peer_python", "setup_peers"]
