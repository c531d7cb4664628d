"""Built-in synthetic tasks with known structure, for testing whether training learns useful thoughts."""
