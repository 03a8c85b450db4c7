"""The command layer: one module per `nbmeter` command, and nothing imports it but nbmeter.cli.

Each module is named after its command and offers `add_arguments(parser)`, which adds the
command's options and sets `func`, the handler returning the exit code (0 ok, 1 a failure
it explains, 2 a usage error). Library packages (api, collector, simulator, storage,
billing, decoder) never import this package.
"""
