"""Per-matrix math: whitening, the factorization engine, ACES, ranks."""
