"""Risk: the checked Python API over the margin kernel, and its plain-Python reference."""
