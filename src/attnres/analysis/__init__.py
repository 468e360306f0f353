"""Training-dynamics diagnostics, plots and reports."""
