"""seqr client: private LoRA-FA training, calibration and signed export (ClientApp)."""
