//! Deterministic discrete-event simulator of host and guest scheduling.
