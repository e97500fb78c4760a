"""The offline demo: tiny models and tokenizers built from config classes (tiny_models, also used by the tests),
the model organism that learns to refuse (organism, organism_text), and the end-to-end workflow (workflow)."""
