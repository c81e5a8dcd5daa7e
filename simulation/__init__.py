"""Flower's Ray-backed simulation of the apps (run.py), its message tick (dispatch.py)
and its CLI: python -m simulation --config configs/quickstart.yaml."""
