"""mnistgen: the runtime core that training, export, Triton's models and the gateway share.

- latent: seeded latent noise (numpy only; the gateway imports it)
- limits: request limits (pure constants) the gateway's validation and the Triton models share
- checkpoint: safetensors checkpoints carrying their config
- models: GAN generator/discriminator architectures
- registry: names of the committed models and how to load them
- diffusion: the DDPM UNet, diffusers schedulers, the sampling and denoise loop

Importing the package imports nothing heavy: torch, diffusers and safetensors load only with the submodules
that need them, so a gateway-only install (`pip install .[serve]`, no torch) can use `mnistgen.latent`.
"""
