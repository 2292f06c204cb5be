"""One module per CLI command; `dropstudy.cli` builds the Typer app from them."""
