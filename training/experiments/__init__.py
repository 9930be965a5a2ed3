"""Research tooling apart from the service: the GAN/DDPM studies, each a grid -> JSON -> markdown (sweep.py)."""
