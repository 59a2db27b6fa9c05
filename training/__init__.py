"""Training, evaluation and model comparison for PneuNet (imports torch; never imported by pneunet/edge)."""
