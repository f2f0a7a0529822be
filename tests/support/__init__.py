"""Support code shared by the tests (harnesses, helpers)."""
