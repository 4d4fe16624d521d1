"""One pulumi.ComponentResource per part of the architecture."""
