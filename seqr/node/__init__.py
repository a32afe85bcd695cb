"""A federation's node: private LoRA-FA training, calibration and signed export (ClientApp)."""
