"""fsam-ds."""
