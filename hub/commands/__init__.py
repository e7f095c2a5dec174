"""The `fedclinic-hub` subcommands, one module per concern."""
