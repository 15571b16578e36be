"""Speech tokenizers: the protocol and registry, and one module per tokenizer family."""
