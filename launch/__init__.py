"""scaler's command line and launchers."""
