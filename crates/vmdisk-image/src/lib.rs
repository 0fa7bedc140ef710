//! image factory (placeholder, being written).
