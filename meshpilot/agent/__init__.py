"""meshpilot's node agent (istio-agent): see meshpilot/agent/command.py."""

# The key helper the agent runs for each certificate (meshpilot/agent/pki.py).
PKI_HELPER_MODULE = "meshpilot.agent.pki"
