//! The instance metadata service (to be written).
