"""The file formats of ostinato's records: checkpoints, exports, XPs (no model code)."""
