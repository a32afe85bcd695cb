"""The ``seqr`` command: one module per command group (main.py dispatches)."""
