//! qcow2 (placeholder, being written).
