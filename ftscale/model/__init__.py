"""Loading base models and tokenizers, and importing the bundled GGUF model."""
