"""End-to-end tests: whole processes and a real cluster (see e2e/README.md)."""
