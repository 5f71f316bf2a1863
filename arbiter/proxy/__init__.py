"""The master's L7 reverse proxy: client protocol, upstream pool, balancer, front cache."""
