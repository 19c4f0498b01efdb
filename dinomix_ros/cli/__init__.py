"""The ``dinomix`` command line: argparse over library calls (``dinomix --help``)."""
