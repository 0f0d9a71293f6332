"""A Kubernetes API server emulator for tests (see tests/kube/apiserver.py)."""
