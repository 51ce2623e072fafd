"""Network architectures: one file each, and one registry (``registry.py``) mapping names to them."""
