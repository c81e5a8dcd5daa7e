"""Deployment on Flower's engine: certificates, a launcher for a SuperLink and
SuperNodes, a fault drill, and the fast path's SuperNode and ClientApp executor
(docs/deploy.md)."""
