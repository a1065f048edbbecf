"""Pure-torch oracles: simple, correct, the fallback backend and the tests' ground truth."""
