"""``hearth fanout``: watch revocation fan-out live.

Follows ``sessions.revoked`` and ``revocations.applied`` and shows, for each revocation, each
holder's apply latency (acknowledgement time minus the revocation's time) and which holders are
still missing once a deadline has passed. ``--summary`` ends with the latency distribution per
holder. Holders are the ones seen acknowledging anything, plus any named with ``--expect``. The same
latencies are exported by each holder as ``hearth_holder_apply_latency_seconds``.
"""
