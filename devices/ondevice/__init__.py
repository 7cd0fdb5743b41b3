"""Files that run on the device (eval.py is copied into every bundle; it imports nothing from ghnq)."""
