"""Visual tokenizers: one file per family, shared blocks, losses.

Runs from the repository root; never installed (the name would shadow Hugging Face's
`tokenizers`)."""
