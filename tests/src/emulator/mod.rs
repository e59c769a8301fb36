//! Emulated Azure token endpoints (IMDS and Entra ID). Being written.
