"""The `speech-lens` command line: `cli.main` builds the parser from one module per command."""
