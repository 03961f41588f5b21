"""raysft control plane: a REST service that submits, tracks and controls fine-tuning jobs on Ray."""
