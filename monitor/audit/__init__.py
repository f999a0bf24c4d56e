"""The audit trail (:mod:`monitor.audit.trail`: a hash-chained, checkpointed, rotating log of what the
monitor saw and flagged) and its verification and export (:mod:`monitor.audit.verify`)."""
