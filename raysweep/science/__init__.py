"""The learning underneath the experiment: datasets, models (GPT-2 included), training, and the compute meter that charges it."""
