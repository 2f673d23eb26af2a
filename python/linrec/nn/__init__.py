"""Drop-in sequence-mixing layers built on linrec's scans: (B, T, d_model) -> (B, T, d_model)."""
