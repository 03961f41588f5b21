"""Serving trained models: chat completions from a base model with a fine-tuned adapter (or a
merged export), rendered with the model's own chat template and streamed token by token."""
