"""The CrossGuard policy pack (see guardrails.py); `pulumi preview --policy-pack policy` runs it."""
