"""Kubernetes plumbing shared by discovery, the CA and the injector.

A low floor: it imports only the `kubernetes_asyncio` client and the standard library,
never the control plane, so every floor above may use it.
"""
