"""The method, pure torch (no Ray): per-token log-probs, losses, teacher scoring, teacher weights, the micro-step."""
