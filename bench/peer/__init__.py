"""Side-by-side benchmark of meshpilot against sovereign (see bench/README.md)."""
