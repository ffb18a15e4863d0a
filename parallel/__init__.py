"""Device mesh, logical-axis rules, the shardings derived from them, and the collectives a compiled step runs."""
