"""Benchmarks of the deployer against its floor and its peers (`scripts/bench`); not part of the test suite."""
