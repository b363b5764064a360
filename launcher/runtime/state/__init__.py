"""State on disk: sharded checkpoints with their manifest, state that is data never code, and export to
Hugging Face safetensors."""
