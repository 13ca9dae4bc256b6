"""Grids used by the tests (selected with OSTINATO_GRIDS=tests.grids)."""
