"""distalign: align language models with human or AI feedback, treated as distribution learning."""
__version__ = "0.1.0"
