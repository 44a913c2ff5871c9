//! The instance runtime (to be written).
