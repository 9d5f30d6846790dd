"""The host side of networks: what a host must have for its guests' NICs (Linux bridges, VXLANs)."""
