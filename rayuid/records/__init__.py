"""What a run leaves behind: checkpoints (one atomic-folder helper), the ledger, the metrics log, plots."""
