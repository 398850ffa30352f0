"""Teacher adapters: each masked-diffusion teacher behind the protocol in ``protocol.py``."""
