"""The federation's operator: admission, plausibility probe, task groups, publishing (ServerApp)."""
