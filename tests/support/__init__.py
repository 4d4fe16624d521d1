"""Helpers for the tests: third-party checkers (network-config-analyzer,
kubernetes-validate, cloud-init, shellcheck) behind small typed wrappers."""
