"""TokenFlow: consistent text-driven video editing with any Stable Diffusion checkpoint."""
