"""One module per `prunescope` subcommand; each defines `register(subparsers)`."""
