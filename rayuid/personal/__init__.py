"""Per-user personalization: LoRA adapters per user, their store and the per-user results (no Ray, no loop)."""
