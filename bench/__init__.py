"""``make bench``: performance figures of dssm-search beside the tools users would pick instead."""
