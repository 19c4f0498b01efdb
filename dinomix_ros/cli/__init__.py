"""The ``dinomix`` command line: argparse over library calls (``dinomix --help``).

:mod:`~dinomix_ros.cli.main` builds the parser and is the one error boundary; each command module
(:mod:`~dinomix_ros.cli.describe`, :mod:`~dinomix_ros.cli.model`, :mod:`~dinomix_ros.cli.bench`,
:mod:`~dinomix_ros.cli.maps`, :mod:`~dinomix_ros.cli.evaluate`) registers its subcommands; what they share is in
:mod:`~dinomix_ros.cli.common`.
"""

from dinomix_ros.util.openmp import sleep_idle_threads

sleep_idle_threads()  # before torch and faiss load
