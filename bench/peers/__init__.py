"""Peer systems (vLLM's CPU build) benchmarked side by side with splitserve.

Peers run in their own virtual environments and are only ever invoked as
subprocesses; nothing here imports them into the project's venv.
"""
