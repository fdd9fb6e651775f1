"""Pre-training: optimizer, sharded train state and step, orbax checkpoints, metrics, the loop."""
