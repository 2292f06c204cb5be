"""The networks, their dropout sites, and MC-dropout evaluation."""
