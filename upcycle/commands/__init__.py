"""One module per `upcycle` subcommand: each parses its options and calls the library."""
