"""Privacy: the privacy modes and what each keeps of a call's content (modes.py),
redaction of traces (redaction.py), and the tenant's secrets and signatures: sealing
at rest, the evidence key, signed reports from a tenant's own gateway (signing.py)."""
