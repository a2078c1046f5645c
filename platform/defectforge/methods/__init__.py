"""Generators, one file each, behind the protocol in ``base.py``; ``registry`` finds them."""
