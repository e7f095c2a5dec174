"""Round-overhead benchmark app for Flower's deployment runtime."""
