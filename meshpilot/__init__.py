"""meshpilot: an Istio-compatible service mesh control plane (Pilot + Citadel) in Python."""

__version__ = "0.1.0"
