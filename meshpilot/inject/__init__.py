"""Sidecar injection: the mutating admission webhook that adds meshpilot's proxy to pods.

`InjectionWebhook` serves Istio's `POST /inject` over HTTPS (istiod's 15017); `patch`
decides and builds the JSON Patch; `template` loads the partial Pod that is added.
"""

from meshpilot.inject.patch import ProxySettings
from meshpilot.inject.template import Template, TemplateError
from meshpilot.inject.webhook import DEFAULT_ADDRESS, InjectionWebhook

__all__ = ["DEFAULT_ADDRESS", "InjectionWebhook", "ProxySettings", "Template", "TemplateError"]
