"""Command line: each command parses its flags, resolves the config and calls one library function.

``train`` holds demo-data, fit, prepare and configs; ``use`` predict, evaluate, export and
explain; ``tools`` report, import-torch and bench; ``common`` the helpers they share.

May import: everything in tfcovid (the top layer), inside the command functions.
"""
# Commands import their library modules (and so TensorFlow, seconds to load) inside the command
# functions, never at the top of a module here: `tfcovid --help` and a usage error stay instant.
# Only click and tfcovid.config (PyYAML, no TensorFlow) load with the command line.

import os
import sys

import click

from tfcovid.cli import tools, train, use
from tfcovid.cli.common import NOT_CLINICAL, quiet_tensorflow

# What a Unix tool's shell reports when a closed pipe (`tfcovid predict ... | head`) kills it
# with SIGPIPE: 128 + 13, as `yes | head` gives. Not 1, which means an image or input failed.
CLOSED_PIPE_STATUS = 141


def _closed_pipe():
    # Python's advice: point stdout at /dev/null so that the flush at exit stays quiet.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(CLOSED_PIPE_STATUS)


class _Group(click.Group):
    """The command group, ending quietly with status 141 when the reader of stdout went away
    (click's own handling exits 1, the status of a failed image, and says nothing)."""

    def make_context(self, *args, **kwargs):  # `tfcovid --help | head -1`
        try:
            return super().make_context(*args, **kwargs)
        except BrokenPipeError:
            _closed_pipe()

    def invoke(self, ctx):
        try:
            try:
                return super().invoke(ctx)
            finally:  # also after sys.exit(1): the last buffered lines meet the pipe here, not at exit
                sys.stdout.flush()
        except BrokenPipeError:
            _closed_pipe()


@click.group(cls=_Group, help=f"Fine-tune ImageNet backbones to classify chest X-rays. {NOT_CLINICAL}")
@click.version_option(package_name="tfcovid")
def main() -> None:
    quiet_tensorflow()


for _command in (train.demo_data, train.fit, train.cv, train.prepare, train.configs, use.predict, use.evaluate,
                 use.calibrate, use.export, use.explain, tools.report, tools.import_torch, tools.bench):
    main.add_command(_command)
