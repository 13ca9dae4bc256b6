"""The training engine every family shares: Trainer from config, dora glue, EMA, guard, checkpoints, export."""
