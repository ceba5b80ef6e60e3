"""Job configuration: torchtitan's TOML sections plus swallow-titan's (see sections.py)."""
