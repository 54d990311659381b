"""Model code: bases and quantization, adapters and their initialisations, AdaLoRA, data, evaluation,
the run's plan and model. It never reads the adapter store."""
