"""`evaluate` metric modules shipped with peft-svd, loaded from their local path (works offline)."""
