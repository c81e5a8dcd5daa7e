"""Deployment on Flower's engine: certificates and a launcher for a SuperLink and
SuperNodes (see the README's "Deploy" section)."""
