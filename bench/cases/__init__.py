"""One module per group of figures; each exposes run(ctx) -> dict of figures."""
