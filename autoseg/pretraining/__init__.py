"""Self-supervised pre-training on images without labels (masked-volume inpainting)."""
