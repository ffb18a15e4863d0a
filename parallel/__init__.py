"""Device mesh, logical-axis rules and the shardings derived from them."""
