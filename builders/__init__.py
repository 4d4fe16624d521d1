"""Pure functions that turn plain values into plain data (manifests, documents).

Nothing here creates a Pulumi resource, so everything here is testable without
Pulumi's engine or mocks.
"""
