//! Pure pvsched policy engine.
